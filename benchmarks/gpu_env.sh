#!/usr/bin/env bash
# Source on the GPU machine: carried wheels (.whl: diffusers and its missing dependencies) go to
# /tmp/site, and ditbake is importable through a namespace folder of links (no install needed).
export PYTHONUNBUFFERED=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
# the cuda extra (nvidia-cudnn-frontend: headers for plugins/csrc, Python graph API), when carried
if ls .whl-cudnn/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl-cudnn/*.whl && export PYTHONPATH=/tmp/site
fi
export DITBAKE_EXT_DIR=${DITBAKE_EXT_DIR:-/tmp/ditbake-ext}  # C++ ops built once per machine
mkdir -p /tmp/ns/ditbake && for p in exporter runtime plugins; do ln -sfn "$PWD/$p" /tmp/ns/ditbake/$p; done; ln -sfn "$PWD/exporter/dropin" /tmp/ns/ditbake/diffusers
export PYTHONPATH=/tmp/ns:$PWD:${PYTHONPATH:-}
# NVLink multicast stays off on shared hosts (the device README says why)
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1

#!/usr/bin/env bash
# Why does aoti_load_package segfault on the GPU image? Gathers the toolchain facts and a native
# backtrace of the crash; each step time-limited so one hang cannot eat the session. → $OUT/aoti_diag.txt
set -u
D=${OUT:-out}/aoti_diag.txt; W=/tmp/aoti_diag; mkdir -p $W
exec > >(tee -a "$D") 2>&1
echo "== env"; echo "CUDA_HOME=${CUDA_HOME:-}"; which nvcc gcc g++ gdb; nvcc --version | tail -2; g++ --version | head -1
python3 -c "import torch, torch.utils.cpp_extension as c; print(torch.__version__, torch.version.cuda, c.CUDA_HOME, torch._C._GLIBCXX_USE_CXX11_ABI)"
ldconfig -p | grep -E "libcuda.so|libcudart" | head
cat > $W/compile.py <<'PY'
import sys, torch
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
x = torch.randn(4, 64, device="cuda")
ep = torch.export.export(m, (x,))
p = torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1])
print("compiled", p)
if len(sys.argv) > 2:
    r = torch._inductor.aoti_load_package(p); print("same-process run", r(x).shape)
PY
cat > $W/load.py <<'PY'
import sys, faulthandler, torch
faulthandler.enable()
if "--init" in sys.argv: torch.zeros(1, device="cuda")
r = torch._inductor.aoti_load_package(sys.argv[1]); print("loaded")
print("ran", r(torch.randn(4, 64, device="cuda")).shape)
PY
echo "== compile"; timeout 240 python3 $W/compile.py $W/mlp.pt2; echo "rc=$?"
echo "== package contents"; python3 -c "import zipfile,sys; [print(i.filename, i.file_size) for i in zipfile.ZipFile(sys.argv[1]).infolist()]" $W/mlp.pt2
mkdir -p $W/x && cd $W/x && python3 -c "import zipfile; zipfile.ZipFile('$W/mlp.pt2').extractall('.')" && cd - >/dev/null
for so in $(find $W/x -name "*.so"); do echo "== ldd $so"; ldd $so; readelf -d $so | grep -E "NEEDED|RUNPATH|RPATH"; done
echo "== load fresh process"; timeout 90 python3 -X faulthandler $W/load.py $W/mlp.pt2; echo "rc=$?"
echo "== load after cuda init"; timeout 90 python3 $W/load.py $W/mlp.pt2 --init; echo "rc=$?"
echo "== compile+load same process"; timeout 200 python3 $W/compile.py $W/mlp2.pt2 same; echo "rc=$?"
if which gdb >/dev/null; then echo "== gdb bt"; timeout 120 gdb -batch -ex run -ex bt --args python3 $W/load.py $W/mlp.pt2 2>&1 | tail -40; fi

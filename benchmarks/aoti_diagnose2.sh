#!/usr/bin/env bash
# Second round on the aoti_load_package segfault: a native backtrace (a SIGSEGV handler preloaded,
# no gdb on the image) and loading the compiled .so directly with the container runner, bypassing
# the package loader. → $OUT/aoti_diag2.txt
set -u
D=${OUT:-out}/aoti_diag2.txt; W=/tmp/aoti_diag2; mkdir -p $W
exec > >(tee -a "$D") 2>&1
cat > $W/segv.c <<'C'
#include <execinfo.h>
#include <signal.h>
#include <unistd.h>
#include <stdlib.h>
static void handler(int sig) { void *b[64]; int n = backtrace(b, 64); backtrace_symbols_fd(b, n, 2); _exit(139); }
__attribute__((constructor)) static void init(void) { signal(SIGSEGV, handler); }
C
gcc -shared -fPIC -o $W/segv.so $W/segv.c && echo "handler built"
cat > $W/compile.py <<'PY'
import sys, torch
m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)).cuda()
x = torch.randn(4, 64, device="cuda")
ep = torch.export.export(m, (x,))
print("compiled", torch._inductor.aoti_compile_and_package(ep, package_path=sys.argv[1]))
PY
cat > $W/load.py <<'PY'
import sys, torch
r = torch._inductor.aoti_load_package(sys.argv[1]); print("loaded")
PY
cat > $W/direct.py <<'PY'
import sys, glob, torch, zipfile, os
d = sys.argv[1] + ".x"; zipfile.ZipFile(sys.argv[1]).extractall(d)
so = glob.glob(d + "/**/*.wrapper.so", recursive=True)[0]; cub = os.path.dirname(so)
print("so", so); print([n for n in dir(torch._C._aoti) if "Runner" in n or "Loader" in n])
x = torch.randn(4, 64, device="cuda")
for args in ((so, 1, "cuda", cub, False), (so, 1, "cuda", cub), (so, 1, "cuda")):
    try:
        r = torch._C._aoti.AOTIModelContainerRunnerCuda(*args); print("runner ok with", len(args), "args")
        print("direct run", r.run([x])[0].shape); break
    except Exception as e:
        print("runner failed", len(args), type(e).__name__, str(e)[:300])
PY
timeout 200 python3 $W/compile.py $W/mlp.pt2
echo "== load with native backtrace"; LD_PRELOAD=$W/segv.so timeout 90 python3 $W/load.py $W/mlp.pt2 2>&1 | c++filt | head -60; echo "rc=${PIPESTATUS[0]}"
echo "== direct runner"; LD_PRELOAD=$W/segv.so timeout 90 python3 $W/direct.py $W/mlp.pt2 2>&1 | c++filt | head -60

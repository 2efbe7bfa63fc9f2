"""Builds tiny torch extensions with different language standards and visibility, and checks
that an error message formatting an integer raises instead of crashing. Tells whether a crash
in fomoe's error paths comes from how extensions are compiled on this machine."""

import subprocess
import sys
import tempfile

SOURCE = r'''
#include <torch/extension.h>
void fail_text() { TORCH_CHECK(false, "text only"); }
void fail_int() { TORCH_CHECK(false, "value ", int64_t(42)); }
PYBIND11_MODULE(NAME, m) { m.def("fail_text", &fail_text); m.def("fail_int", &fail_int); }
'''

VARIANTS = {
    "cxx17": ["-std=c++17"],
    "cxx20": ["-std=c++20"],
    "cxx20_hidden": ["-std=c++20", "-fvisibility=hidden"],
}

BUILD = r'''
import sys, torch.utils.cpp_extension as ce
name, flags, build = sys.argv[1], sys.argv[2].split(), sys.argv[3]
ce.load_inline(name, SOURCE.replace("NAME", name), extra_cflags=flags, build_directory=build, verbose=False)
'''.replace("SOURCE", repr(SOURCE))

CALL = r'''
import sys, torch.utils.cpp_extension as ce, importlib.util
spec = importlib.util.spec_from_file_location(sys.argv[1], sys.argv[2] + "/" + sys.argv[1] + ".so")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
try:
    getattr(mod, sys.argv[3])()
except RuntimeError as e:
    print("raised", str(e).splitlines()[0])
'''


def main() -> int:
    procs = {}
    dirs = {}
    for name, flags in VARIANTS.items():
        dirs[name] = tempfile.mkdtemp(prefix=f"probe_{name}_")
        procs[name] = subprocess.Popen([sys.executable, "-c", BUILD, f"probe_{name}", " ".join(flags), dirs[name]],
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for name, proc in procs.items():
        out, _ = proc.communicate()
        if proc.returncode:
            print(f"{name}: build failed\n{out[-800:]}")
            continue
        for fn in ("fail_text", "fail_int"):
            r = subprocess.run([sys.executable, "-c", CALL, f"probe_{name}", dirs[name], fn], capture_output=True,
                               text=True)
            result = r.stdout.strip() if r.returncode == 0 else f"CRASHED (exit {r.returncode})"
            print(f"{name:14s} {fn:10s} {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

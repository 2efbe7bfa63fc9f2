"""Checks that every kind of input error raises a Python exception instead of crashing the
process: each case runs in its own interpreter, and the exit status says what happened.
Used on new machines/toolchains (a crash here points at the C++ runtime, not the kernels)."""

import subprocess
import sys

PRELUDE = "import torch, fomoe\nfrom fomoe import ops\n"
CASES = {
    "text message (fomoe, dtype)": "ops.route(torch.ones(4, 3, dtype=torch.int64), 1)",
    "integer in message (fomoe, top_k)": "ops.route(torch.randn(4, 3), 0)",
    "integer in message (fomoe, num_local)": "ops.dispatch(torch.zeros(2, 1, dtype=torch.int32), torch.arange(3, dtype=torch.int32), 9)",
    "shape in message (fomoe)": "ops.route(torch.randn(12), 1)",
    "integer in message (libtorch)": "torch.zeros(2, 3) @ torch.zeros(4, 5)",
    "table value (fomoe)": "ops.gather(torch.randn(2, 3), torch.tensor([5, 0], dtype=torch.int32), torch.tensor([[1]], dtype=torch.int32).expand(2, 1).contiguous())",
}


def main() -> int:
    bad = 0
    for name, code in CASES.items():
        proc = subprocess.run([sys.executable, "-c", PRELUDE + f"try:\n    {code}\nexcept (RuntimeError, ValueError) as e:\n    print('raised:', str(e).splitlines()[0][:100])\n"],
                              capture_output=True, text=True)
        outcome = proc.stdout.strip() if proc.returncode == 0 else f"CRASHED (exit {proc.returncode}) {proc.stderr.strip()[-200:]}"
        bad += proc.returncode != 0
        print(f"{name:42s} {outcome}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())

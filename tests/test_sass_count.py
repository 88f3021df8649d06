"""scripts/sass_count.py: the offline sm_90 compile of a real kernel launch (no GPU needed) reports the SASS
instruction counts, and a config override reaches the launch (turning the default even/pairs/agg off
changes the code)."""
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "sass_count.py"


def count(*extra) -> int:
    out = subprocess.run([sys.executable, str(SCRIPT), "mamba1-fwd", "--b", "1", "--d", "16", "--l", "512", *extra],
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    m = re.search(r"_scan_time_fwd_kt_kernel: (\d+) instructions, 1 warps; REG:(\d+)", out.stdout)
    assert m, out.stdout
    assert 0 < int(m.group(2)) <= 128  # maxnreg
    return int(m.group(1))


def test_sass_count_mamba1_forward():
    plain = count("--set", "even=False", "pairs=False", "agg=False")
    lean = count()
    assert 1000 < lean < plain, (plain, lean)


def scripts_python(code: str) -> str:
    """Runs code in a fresh interpreter with scripts/ importable (importing sass_count drops TRITON_INTERPRET
    from the environment, so not in this process) and returns its stdout."""
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(SCRIPT.parent)!r})\n{code}"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


def test_parse_overrides():
    """KEY=VALUE overrides (shared by sass_count and the GPU timing scripts): booleans, None, ints (negative
    too), and other values as strings (quad=bfly)."""
    out = scripts_python("from sass_count import parse_overrides\n"
                         "print(sorted(parse_overrides(['a=8', 'b=True', 'c=None', 'd=bfly', 'e=-2', 'f=False']).items()))")
    assert out.strip() == str(sorted(dict(a=8, b=True, c=None, d="bfly", e=-2, f=False).items()))


def test_each_override():
    """each_override (the GPU timing scripts' loop): the defaults, each spec, the defaults again, and the config
    restored afterwards, also when the loop stops early."""
    out = scripts_python("from sass_count import each_override\n"
                         "cfg = dict(a=1, b=False)\n"
                         "seen = [(s, dict(cfg)) for s in each_override(cfg, ['a=3', 'a=4,b=True'])]\n"
                         "print(seen, cfg)\n"
                         "for s in each_override(cfg, ['a=5']):\n"
                         "    if cfg['a'] == 5: break\n"
                         "print(cfg)")
    seen = [("", dict(a=1, b=False)), ("a=3", dict(a=3, b=False)), ("a=4,b=True", dict(a=4, b=True)),
            ("", dict(a=1, b=False))]
    assert out.splitlines() == [f"{seen} {dict(a=1, b=False)}", str(dict(a=1, b=False))]

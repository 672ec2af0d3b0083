import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _block(marker: str, lang: str) -> str:
    m = re.search(rf"<!-- {marker} -->\s*```{lang}\n(.*?)```", README, re.S)
    assert m, f"README.md has no ```{lang} block after <!-- {marker} -->"
    return m.group(1)


def test_readme_example_trains_a_user_model(capsys):
    namespace: dict = {}
    exec(compile(_block("readme-example", "python"), "README.md", "exec"), namespace)
    hist = namespace["result"].history
    assert hist[-1]["val_elbo"] > hist[0]["val_elbo"] + 3.0  # measured: about -38 -> -28 nats
    assert "validation ELBO" in capsys.readouterr().out
    assert len(_block("readme-example", "python").splitlines()) < 30


def test_ci_runs_the_readme_test_command():
    cmd = _block("test-command", "bash").strip()
    printed = subprocess.run(
        ["awk", '/<!-- test-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}',
         str(ROOT / "README.md")], capture_output=True, text=True, check=True).stdout.strip()
    assert printed == cmd and "pytest" in cmd and "pip install" in cmd
    assert "README.md" in (ROOT / ".ci" / "run").read_text()
    assert "ppgen demo" in _block("demo-command", "bash")


def test_ci_runs_the_device_tests_on_the_cpu():
    """CI has no GPU and runs plain `pytest -q` (above): tests/test_cuda.py must still run there,
    once per test on the CPU, not skip as a module (it used to, unless PPGEN_TEST_DEVICE=cpu)."""
    import os
    import sys

    env = {k: v for k, v in os.environ.items() if k != "PPGEN_TEST_DEVICE"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # as on a CI machine without a GPU
    out = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                          str(ROOT / "tests" / "test_cuda.py")], capture_output=True, text=True, env=env, cwd=ROOT)
    ids = [line for line in out.stdout.splitlines() if "::" in line]
    tests = re.findall(r"^def (test_\w+)\(", (ROOT / "tests" / "test_cuda.py").read_text(), re.M)
    assert len(tests) >= 4 and sorted(ids) == sorted(f"tests/test_cuda.py::{t}[cpu]" for t in tests), out.stdout

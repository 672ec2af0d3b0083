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

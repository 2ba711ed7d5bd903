"""Optional features: each names its pip extra in one line when its package is missing, and every
extra named that way is declared in pyproject.toml (and kept out of the core dependencies)."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from rerank_dist.cli import main
from rerank_dist.config import ModelConfig
from rerank_dist.errors import USER_ERRORS
from rerank_dist.extras import MissingExtraError

ROOT = Path(__file__).resolve().parents[1]


def _hide(monkeypatch, module: str) -> None:
    # None in sys.modules is how Python marks a module as not importable: find_spec gives None and
    # `import module` raises ImportError, as in an environment without the extra.
    monkeypatch.setitem(sys.modules, module, None)


def test_missing_extra_is_a_user_error():
    assert issubclass(MissingExtraError, USER_ERRORS)  # the CLI prints it as one line, exit status 2


def test_nf4_without_bitsandbytes_names_the_qlora_extra(monkeypatch, tmp_path):
    import transformers

    from rerank_dist.modeling import load_base_model

    _hide(monkeypatch, "bitsandbytes")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained",
                        lambda *a, **k: pytest.fail("no weights may load without bitsandbytes"))
    with pytest.raises(MissingExtraError) as err:
        load_base_model(ModelConfig(quantization="nf4", dtype="float32"), source=tmp_path)
    assert str(err.value) == "model.quantization=nf4 needs bitsandbytes: pip install 'rerank_dist[qlora]'"


@pytest.mark.parametrize("backend", ["zero2", "zero3"])
def test_deepspeed_backend_without_deepspeed_stops_before_any_stage(monkeypatch, tmp_path, capsys, backend):
    _hide(monkeypatch, "deepspeed")
    run_dir = tmp_path / "run"
    assert main(["train", f"run_dir={run_dir}", f"train.backend={backend}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: train.backend={backend} needs deepspeed: pip install 'rerank_dist[deepspeed]'"]
    assert not run_dir.exists()


def _extras() -> tuple[list[str], dict[str, list[str]]]:
    """(core dependencies, extra -> requirements) from pyproject.toml; a regex, not tomllib (3.10 has none)."""
    text = (ROOT / "pyproject.toml").read_text()
    core = re.search(r"^dependencies = \[(.*?)^\]", text, re.M | re.S)
    section = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.M | re.S)
    assert core and section, "pyproject.toml: no dependencies or no [project.optional-dependencies]"
    extras = {m.group(1): re.findall(r'"([^"]+)"', m.group(2))
              for m in re.finditer(r"^(\w+) = \[(.*)\]", section.group(1), re.M)}
    return re.findall(r'"([^"]+)"', core.group(1)), extras


def _required() -> set[tuple[str, str]]:
    """(module, extra) of every require(...) call in the package, read from the source."""
    found = set()
    for path in (ROOT / "rerank_dist").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "require":
                module, extra = (a.value for a in node.args[:2])
                found.add((module, extra))
    return found


def test_every_extra_the_package_asks_for_is_declared_and_not_in_the_core():
    core, extras = _extras()
    required = _required()
    assert {("bitsandbytes", "qlora"), ("deepspeed", "deepspeed")} <= required  # the scan sees the calls
    names = lambda reqs: {re.split(r"[<>=\[; ]", r, maxsplit=1)[0].lower() for r in reqs}  # noqa: E731
    for module, extra in sorted(required):
        assert extra in extras, f"require({module!r}, {extra!r}): no [{extra}] extra in pyproject.toml"
        assert module in names(extras[extra]), f"[{extra}] does not install {module}"
        assert module not in names(core), f"{module} is in the core dependencies; it belongs to [{extra}] only"
    everything = " ".join(extras["all"])
    assert all(extra in everything for _, extra in required)  # [all] installs every feature

"""The shape of the package: no import cycle, no dispatch on the model class outside the models,
FLOP counts that match torch's own counter, and formatting enforced by ruff."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm_models.autoencoder import Autoencoder
from calm_models.baseline import TokenLM
from calm_models.config import AutoencoderConfig, BackboneConfig, CALMConfig, HeadConfig, TokenLMConfig
from calm_models.flops import backbone_flops, head_flops, linear_flops
from calm_models.model import CALM

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "calm_models"
MODEL_MODULES = {"autoencoder", "backbone", "baseline", "heads", "model", "flops", "protocol"}


def _imports(path: Path) -> set[str]:
    """calm_models modules imported anywhere in a file (also inside functions)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("calm_models"):
            parts = node.module.split(".")
            found.add(parts[1] if len(parts) > 1 else next(a.name for a in node.names))
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("calm_models.")}
    return found - {path.stem}


def test_no_module_imports_one_that_imports_it_back():
    graph = {p.stem: _imports(p) for p in PACKAGE.glob("*.py") if p.stem != "__init__"}

    def reaches(start: str, target: str, seen: set[str]) -> bool:
        for nxt in graph.get(start, ()):
            if nxt == target or (nxt not in seen and reaches(nxt, target, seen | {nxt})):
                return True
        return False

    cycles = [m for m in graph if reaches(m, m, {m})]
    assert cycles == [], f"import cycles through {cycles}"


def test_tools_never_dispatch_on_the_model_class():
    for path in PACKAGE.glob("*.py"):
        if path.stem in MODEL_MODULES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                assert not names & {"CALM", "TokenLM", "Autoencoder"}, (path.name, node.lineno)


def _count(fn) -> int:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the math attention kernel is plain matmuls, which the counter sees (the fused CPU kernel
    # is not counted)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


def test_flops_match_torch_flop_counter():
    torch.manual_seed(0)
    cfg = BackboneConfig(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, ffn_size=48)
    lm = TokenLM(TokenLMConfig(vocab_size=50, backbone=cfg))
    t = 12
    tokens = torch.randint(50, (1, t))
    assert _count(lambda: lm.logits(tokens)) == t * lm.flops_per_token(t)["inference"]
    assert lm.flops_per_token(t)["train"] == 3 * lm.flops_per_token(t)["inference"]
    ae = Autoencoder(AutoencoderConfig(vocab_size=50, latent_size=8, hidden_size=16))
    with torch.no_grad():
        mean, _ = ae.encode(tokens)
    assert _count(lambda: ae.decode(mean)) == t * ae.flops_per_token()["inference"]
    assert _count(lambda: ae.encode(tokens)) == t * ae.flops_per_token()["encode"]
    model = CALM(CALMConfig(backbone=cfg, head=HeadConfig(hidden_size=16, num_blocks=1), num_targets=4), ae)
    chunks = t // 4
    trunk = _count(lambda: model.hidden_states(tokens))
    assert trunk == chunks * (linear_flops(model.compress) + backbone_flops(cfg, chunks))
    with torch.no_grad():
        hidden = model.hidden_states(tokens)
    assert _count(lambda: model.head.sample(hidden, 1)) == chunks * head_flops(model.head)
    flops = model.flops_per_token(t)
    per_chunk = trunk / chunks + head_flops(model.head) + 4 * ae.flops_per_token()["inference"]
    assert flops["inference"] == pytest.approx(per_chunk / 4)


def test_code_is_formatted_and_linted():
    ruff = shutil.which("ruff") or (Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed (the [dev] extra has it)")
    for args in (["format", "--check", "."], ["check", "."]):
        proc = subprocess.run([str(ruff), *args], cwd=ROOT, capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

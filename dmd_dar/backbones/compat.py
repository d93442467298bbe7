"""Which diffusers versions the adapters are proven against, and fingerprints of the code they mirror.

The adapters copy the bodies of diffusers block and model ``forward`` methods (sublayer by sublayer). A change
upstream would silently desynchronise them, so every mirrored function is fingerprinted: a hash of its source
with docstrings, comments and type annotations removed (type-hint modernisation is not a semantic change).
``tests/test_backbones_fingerprint.py`` compares the installed diffusers against ``RECORDED_FINGERPRINTS``; the
parity tests then prove the adapters equal the stock models on the versions in ``TESTED_DIFFUSERS``.

To extend the range: install the new diffusers, run ``pytest tests/test_backbones_*.py``, re-check any adapter
whose fingerprint changed, update the hash and ``TESTED_DIFFUSERS``.
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import textwrap
import warnings

import diffusers
from packaging.specifiers import SpecifierSet
from packaging.version import Version

#: diffusers versions on which the fingerprint and parity tests passed.
TESTED_DIFFUSERS = ">=0.42.1,<=0.42.1"

#: "module:Qualname.forward" -> fingerprint, recorded on diffusers 0.42.1.
RECORDED_FINGERPRINTS: dict[str, str] = {
    "diffusers.models.attention:BasicTransformerBlock.forward": "b280bdd4e72ba860",
    "diffusers.models.attention:JointTransformerBlock.forward": "6fb986dece937834",
    "diffusers.models.transformers.dit_transformer_2d:DiTTransformer2DModel.forward": "fe4b06c960c07f67",
    "diffusers.models.transformers.pixart_transformer_2d:PixArtTransformer2DModel.forward": "e2d5d7cb59447285",
    "diffusers.models.transformers.transformer_sd3:SD3Transformer2DModel.forward": "ed1e95fd5de0fec8",
    "diffusers.models.transformers.transformer_flux:FluxTransformerBlock.forward": "1a653ec2a3baf170",
    "diffusers.models.transformers.transformer_flux:FluxSingleTransformerBlock.forward": "0f793de984d563ae",
    "diffusers.models.transformers.transformer_flux:FluxTransformer2DModel.forward": "a18fdfdd0050469f",
    "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformerBlock.forward": "7ef72510e31e5e55",
    "diffusers.models.transformers.transformer_qwenimage:QwenImageTransformer2DModel.forward": "8166167e2c5cc7d2",
}


def diffusers_version() -> Version:
    return Version(diffusers.__version__)


def is_tested_diffusers(version: Version | str | None = None) -> bool:
    version = diffusers_version() if version is None else Version(str(version))
    return SpecifierSet(TESTED_DIFFUSERS).contains(version, prereleases=True)


def warn_if_untested_diffusers() -> None:
    """Warn (once per call site) when the installed diffusers is outside ``TESTED_DIFFUSERS``."""
    version = diffusers_version()
    if not is_tested_diffusers(version):
        warnings.warn(
            f"dmd_dar.backbones: diffusers {version} is outside the tested range {TESTED_DIFFUSERS}; the DAR "
            "adapters re-implement diffusers block bodies, so run tests/test_backbones_*.py (parity + fingerprints) "
            "before trusting them on this version",
            UserWarning,
            stacklevel=3,
        )


def resolve(target: str) -> object:
    """The function named ``"module:Qualname.attr"``, unwrapped from decorators such as ``apply_lora_scale``."""
    module_name, qualname = target.split(":")
    obj: object = importlib.import_module(module_name)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    return inspect.unwrap(obj)


class _StripAnnotations(ast.NodeTransformer):
    def visit_arg(self, node: ast.arg) -> ast.arg:
        node.annotation = None
        return node

    def visit_FunctionDef(self, node: ast.FunctionDef) -> ast.FunctionDef:
        node.returns = None
        node.decorator_list = []
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]
        self.generic_visit(node)
        return node

    def visit_AnnAssign(self, node: ast.AnnAssign) -> ast.AST:
        if node.value is None:
            return node
        return ast.copy_location(ast.Assign(targets=[node.target], value=node.value, lineno=node.lineno), node)


def fingerprint(target: str) -> str:
    """A short hash of the semantics-bearing source of ``target`` (docstring, comments and annotations removed)."""
    source = textwrap.dedent(inspect.getsource(resolve(target)))
    tree = _StripAnnotations().visit(ast.parse(source))
    tree.body[0].name = "_"  # the key names the function; a rename alone is not a change
    return hashlib.sha256(ast.unparse(tree).encode()).hexdigest()[:16]

"""The runtime needs what setup.py lists, and never transformers (the tests' reference)."""
import ast
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STDLIB = set(sys.stdlib_module_names)
IMPORT_NAMES = {"pillow": "PIL", "huggingface_hub": "huggingface_hub"}


def _runtime_imports() -> set[str]:
    names = set()
    for base in ("qwen_batched", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, base)):
            for f in files:
                if f.endswith(".py"):
                    tree = ast.parse(open(os.path.join(dirpath, f)).read())
                    for node in ast.walk(tree):
                        if isinstance(node, ast.Import):
                            names |= {a.name.split(".")[0] for a in node.names}
                        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                            names.add(node.module.split(".")[0])
    return names - STDLIB - {"qwen_batched", "triton", "flash_attn"}  # triton / flash-attn: optional kernels


def test_setup_lists_the_runtime_imports():
    src = open(os.path.join(ROOT, "setup.py")).read()
    call = next(n for n in ast.walk(ast.parse(src)) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    kw = {k.arg: k.value for k in call.keywords}
    required = {ast.literal_eval(e).split(">")[0].split("=")[0] for e in kw["install_requires"].elts}
    provided = {IMPORT_NAMES.get(r, r) for r in required}
    assert _runtime_imports() <= provided, _runtime_imports() - provided
    assert "transformers" not in required and "einops" not in required


def test_the_model_runs_without_importing_transformers():
    code = ("import sys, torch; from qwen_batched import QwenBatchedVL; m = QwenBatchedVL.from_config('tiny'); "
            "m.generate(images=torch.zeros(1, 3, 56, 56, dtype=torch.uint8), texts=['hi'], max_new_tokens=2); "
            "assert 'transformers' not in sys.modules, 'transformers was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT})

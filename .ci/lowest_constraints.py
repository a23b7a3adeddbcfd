"""Print pip constraints pinning torch, transformers and gguf to the `>=X` bounds of setup.py's
install_requires (`name==X`).

CI installs the package against them to test the lowest versions we declare support for.
"""

import ast
import pathlib
import re

PINNED = ("torch", "transformers", "gguf")
setup_py = pathlib.Path(__file__).resolve().parent.parent / "setup.py"
tree = ast.parse(setup_py.read_text())
for node in ast.walk(tree):
    if isinstance(node, ast.keyword) and node.arg == "install_requires":
        for req in ast.literal_eval(node.value):
            m = re.fullmatch(r"([A-Za-z0-9_.\-]+)>=([0-9][0-9A-Za-z.]*)", req.replace(" ", ""))
            if m and m.group(1) in PINNED:
                print(f"{m.group(1)}=={m.group(2)}")
        break
else:
    raise SystemExit("setup.py has no install_requires")

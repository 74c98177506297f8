"""The documents stand on their own: a fresh clone holds everything they link to and
they point nowhere outside it; every environment variable the code reads is
documented; and the layering the architecture document describes holds."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
OUTSIDE = re.compile(r"\.\./shared|/work/|shared/(DESIGN|STRIPE|FAILURES|STYLE)\.md")
ENV_READ = re.compile(r"(?:environ\.get|getenv|_int|_bool|_decimal|_list|env\.get|env\.setdefault)"
                      r"""\(\s*["']([A-Z][A-Z0-9_]+)["']""")


def test_a_fresh_clone_holds_every_file_its_documents_link_to(tmp_path):
    alone = tmp_path / "alone"  # a folder with nothing beside the clone
    alone.mkdir()
    clone = alone / "portal"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True, timeout=120)
    documents = [path for path in clone.rglob("*.md") if ".git" not in path.parts]
    assert clone / "README.md" in documents and clone / "docs" / "architecture.md" in documents
    problems = []
    checked = 0
    for document in documents:
        text = document.read_text()
        where = document.relative_to(clone)
        for match in OUTSIDE.finditer(text):
            problems.append(f"{where}: mentions {match.group(0)!r}")
        for target in LINK.findall(text):
            if re.match(r"^[a-z]+:", target) or target.startswith("#"):
                continue  # a web address, mailto:, or an anchor in the same page
            resolved = (document.parent / target.split("#", 1)[0]).resolve()
            checked += 1
            if not resolved.is_relative_to(clone.resolve()):
                problems.append(f"{where}: {target} leads outside the tree")
            elif not resolved.exists():
                problems.append(f"{where}: {target} does not exist")
    assert not problems, "\n".join(problems)
    assert checked > 20  # the documents do link to each other


def test_every_environment_variable_the_code_reads_is_documented():
    sources = [ROOT / "config.py", ROOT / "run.py", ROOT / "wsgi.py"]
    for folder in ("portal", "jobs", "stripe_emulator"):
        sources += sorted((ROOT / folder).rglob("*.py"))
    read = {name for source in sources for name in ENV_READ.findall(source.read_text())} - {"PATH", "PYTHONPATH"}
    assert {"DATABASE_URL", "STRIPE_EMULATOR_PORT", "PORTAL_LOCK_LEASE_SECONDS"} <= read
    documented = (ROOT / "docs" / "configuration.md").read_text()
    missing = sorted(name for name in read if f"`{name}`" not in documented)
    assert not missing, f"read by the code but not in docs/configuration.md: {missing}"


def _imports(path: Path) -> set[str]:
    """Modules a file imports, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_opening_an_invoice_imports_nothing_that_opens_invoices():
    below = ("invoices", "placement", "service_charges", "pricing", "bulk", "cycles")
    above = {f"portal.billing.{name}" for name in ("usage", "services", "credits", "closing", "sync", "events")}
    for name in below:
        imported = _imports(ROOT / "portal" / "billing" / f"{name}.py")
        assert not imported & above, f"portal/billing/{name}.py imports {sorted(imported & above)}"


def test_the_portal_never_imports_jobs_or_the_emulator():
    for path in sorted((ROOT / "portal").rglob("*.py")):
        wrong = {module for module in _imports(path) if module.split(".")[0] in ("jobs", "stripe_emulator")}
        assert not wrong, f"{path.relative_to(ROOT)} imports {sorted(wrong)}"

"""Local Sphinx extension of the likelihood-free docs.

* Links to re-exported names: ``:func:`likelihood_free.energy_loss``` (the public import path)
  resolves to the object documented in its module, ``likelihood_free.energy.energy_loss``. Each
  object is documented once, on its module's page, so there are no duplicate descriptions. A
  name imported into the current module (``:class:`KVCache``` in ``calm_models.baseline``)
  resolves the same way.
* ``.. generated-include:: _generated/results``: includes ``_generated/results.rst`` or, failing
  that, ``_generated/results.md`` (parsed by MyST); when neither exists, the directive's own
  content is rendered instead, so the page builds either way.
* ``.. command::`` shows a shell command (``python -m calm_models.X ...``) and, for
  ``sphinx.ext.doctest``, runs exactly that command in-process (``module.main(argv)``), so a
  following ``.. testoutput::`` block checks what it prints. What is shown is what is run.
* NamedTuple field aliases ("Alias for field number 0") are left out of the API pages: the
  fields are already listed in each class's ``Attributes`` section. Constants of a module's
  ``__all__`` without a doc comment, which ``automodule`` would leave out, are added to its page.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
from pathlib import Path
from typing import Any

from docutils import nodes
from sphinx.application import Sphinx
from sphinx.util.docutils import SphinxDirective
from sphinx.util.inspect import object_description

_PACKAGES = ("likelihood_free", "calm_models")


# ----------------------------------------------------------------------------------------------
# Re-exported names
# ----------------------------------------------------------------------------------------------


def canonical_name(target: str) -> str | None:
    """The documented (defining-module) name of a dotted public name, or ``None``.

    ``"likelihood_free.BrierLM.update"`` -> ``"likelihood_free.brier.BrierLM.update"``.
    """
    parts = target.split(".")
    if parts[0] not in _PACKAGES:
        return None
    obj: Any = None
    index = 0
    for i in range(len(parts), 0, -1):  # longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except Exception:
            continue
        index = i
        break
    if obj is None:
        return None
    canonical = ".".join(parts[:index])
    for j in range(index, len(parts)):
        try:
            obj = getattr(obj, parts[j])
        except AttributeError:
            return None
        module, qualname = getattr(obj, "__module__", None), getattr(obj, "__qualname__", None)
        if isinstance(module, str) and isinstance(qualname, str) and module.startswith(_PACKAGES):
            canonical = f"{module}.{qualname}"
        else:
            canonical = f"{canonical}.{parts[j]}"
    return canonical if canonical != target else None


def _resolve_reexport(app: Sphinx, env: Any, node: nodes.Element, contnode: nodes.Node):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "")
    canonical = canonical_name(target)
    module = node.get("py:module") or ""
    if canonical is None and module.startswith(_PACKAGES) and not target.startswith(_PACKAGES):
        # `Backbone.forward` written in calm_models.baseline, which imports Backbone
        canonical = canonical_name(f"{module}.{target}")
    if canonical is None:
        return None
    domain = env.get_domain("py")
    new = node.deepcopy()
    new["reftarget"] = canonical
    return domain.resolve_xref(env, node.get("refdoc", ""), app.builder, node["reftype"], canonical, new, contnode)


def _skip_member(app: Sphinx, what: str, name: str, obj: Any, skip: bool, options: Any):
    doc = getattr(obj, "__doc__", None)
    if isinstance(doc, str) and doc.startswith("Alias for field number"):
        return True
    return None


def undocumented_data(module_name: str) -> list[str]:
    """Names of ``module.__all__`` that autodoc's ``:members:`` leaves out.

    autodoc documents a module-level constant only when it has a doc comment (``#:``) or a
    docstring after it; these names are added to the module's page by :func:`_add_data`.
    """
    from sphinx.pycode import ModuleAnalyzer

    module = importlib.import_module(module_name)
    try:
        attr_docs = ModuleAnalyzer.for_module(module_name).find_attr_docs()
    except Exception:
        attr_docs = {}
    names = []
    for name in getattr(module, "__all__", []):
        obj = getattr(module, name, None)
        if callable(obj) or ("", name) in attr_docs:
            continue
        names.append(name)
    return names


def _add_data(app: Sphinx, docname: str, source: list[str]) -> None:
    """Append ``py:data`` entries (name and value) for the undocumented constants of a page.

    ``autodata`` would show the docstring of the value's type (``tuple``, ``str``) instead.
    """
    prefix = "api/"
    if not docname.startswith(prefix) or not docname[len(prefix) :].startswith(_PACKAGES):
        return
    module_name = docname[len(prefix) :]
    try:
        names = undocumented_data(module_name)
    except Exception:
        return  # automodule itself reports a module that cannot be imported
    module = importlib.import_module(module_name)
    for name in names:
        value = " ".join(object_description(getattr(module, name)).split())
        source[0] += f"\n.. py:data:: {name}\n   :module: {module_name}\n   :value: {value}\n"


# ----------------------------------------------------------------------------------------------
# Generated results: an .rst file, else a Markdown file (parsed by MyST), else a placeholder
# ----------------------------------------------------------------------------------------------

_IMAGE_LINK = re.compile(r"(!\[[^\]]*\]\()(?![a-z]+:|/)")


class GeneratedInclude(SphinxDirective):
    """Include ``ARG.rst``, else ``ARG.md`` (with MyST), else render the directive's content.

    Image paths of the Markdown file are relative to it; they are rewritten relative to the
    including page, because Sphinx resolves included images from there.
    """

    required_arguments = 1
    has_content = True

    def run(self) -> list[nodes.Node]:
        base = self.env.relfn2path(self.arguments[0], self.env.docname)[1]
        rst, md = Path(base + ".rst"), Path(base + ".md")
        if rst.is_file():
            self.env.note_dependency(str(rst))
            lines = rst.read_text(encoding="utf-8").splitlines()
            source = str(rst)
        elif md.is_file():
            self.env.note_dependency(str(md))
            prefix = Path(self.arguments[0]).parent.as_posix() + "/"
            copy = Path(self.env.app.doctreedir) / "generated-include" / md.name
            copy.parent.mkdir(parents=True, exist_ok=True)
            copy.write_text(_IMAGE_LINK.sub(rf"\g<1>{prefix}", md.read_text(encoding="utf-8")), encoding="utf-8")
            source = self.get_source_info()[0]
            relative = os.path.relpath(copy, Path(source).parent)  # "/x" means srcdir/x here
            lines = [f".. include:: {relative}", "   :parser: myst_parser.sphinx_"]
        else:  # no generated file yet: the placeholder written in the page
            lines, source = list(self.content), self.get_source_info()[0]
        # Like `.. include::`: the lines go into the page's input, so they may hold sections.
        self.state_machine.insert_input(lines + [""], source)
        return []


# ----------------------------------------------------------------------------------------------
# Commands that are shown and run
# ----------------------------------------------------------------------------------------------


def command_argv(command: str) -> tuple[str, list[str]]:
    """``"python -m pkg.mod --x 1"`` -> ``("pkg.mod", ["--x", "1"])`` (line continuations ok)."""
    words = shlex.split(command.replace("\\\n", " "))
    if len(words) < 3 or words[0] not in ("python", "python3") or words[1] != "-m":
        raise ValueError(f"expected 'python -m MODULE ...', got {command!r}")
    return words[2], words[3:]


def run_command(command: str) -> None:
    """Run ``python -m MODULE ARGS`` in this process as ``MODULE.main(ARGS)``.

    Prints ``[exit status N]`` when the command fails, so that a failure shows in the output.
    """
    module, argv = command_argv(command)
    status = importlib.import_module(module).main(argv)
    if status:
        print(f"[exit status {status}]")


class Command(SphinxDirective):
    """A console block with one ``python -m ...`` command, also run by the doctest builder.

    Options: ``:group:`` doctest group (default ``default``); ``:no-run:`` only shows it.
    """

    has_content = True
    option_spec = {"group": lambda arg: arg.strip(), "no-run": lambda arg: True}

    def run(self) -> list[nodes.Node]:
        command = "\n".join(self.content).strip()
        shown = nodes.literal_block(f"$ {command}", f"$ {command}", language="console")
        self.set_source_info(shown)
        if "no-run" in self.options:
            return [shown]
        try:
            command_argv(command)
        except ValueError as exc:
            raise self.error(str(exc)) from None
        code = f"from calm_docs import run_command\nrun_command({command!r})"
        test = nodes.comment(code, code, testnodetype="testcode", groups=[self.options.get("group", "default")])
        test["options"] = {}
        self.set_source_info(test)
        return [shown, test]


def setup(app: Sphinx) -> dict[str, Any]:
    app.setup_extension("sphinx.ext.autodoc")  # for the autodoc-skip-member event
    app.setup_extension("myst_parser")  # Markdown results
    app.connect("missing-reference", _resolve_reexport)
    app.connect("autodoc-skip-member", _skip_member)
    app.connect("source-read", _add_data)
    app.add_directive("generated-include", GeneratedInclude)
    app.add_directive("command", Command)
    return {"version": "1.0", "parallel_read_safe": True, "parallel_write_safe": True}

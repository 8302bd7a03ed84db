"""Build hook: compile the gettext catalogues (bot/locales/*/LC_MESSAGES/bot.po → .mo).

Everything else about the package is in pyproject.toml. The compile step is a
`build` sub-command, so it runs for wheels, sdists built into wheels, and
editable installs (`pip install -e .`), where it writes the .mo files next to
the .po files in the source tree (PEP 660: generated files go "in place").
"""

from __future__ import annotations

from pathlib import Path

from setuptools import Command, setup
from setuptools.command.build import build

LOCALES = Path("bot") / "locales"


class compile_catalogs(Command):
    """Compile every bot.po with Babel."""

    description = "compile the gettext catalogues with Babel"
    user_options: list[tuple[str, str | None, str]] = []  # noqa: RUF012

    def initialize_options(self) -> None:
        self.build_lib: str | None = None
        self.editable_mode = False

    def finalize_options(self) -> None:
        self.set_undefined_options("build_py", ("build_lib", "build_lib"))

    def _pairs(self) -> list[tuple[Path, Path]]:
        target = Path(".") if self.editable_mode else Path(self.build_lib or "build/lib")
        return [(po, target / po.with_suffix(".mo"))
                for po in sorted(LOCALES.glob("*/LC_MESSAGES/bot.po"))]

    def run(self) -> None:
        from babel.messages.mofile import write_mo
        from babel.messages.pofile import read_po

        for po, mo in self._pairs():
            with po.open("rb") as fh:
                catalog = read_po(fh, locale=po.parent.parent.name, domain="bot")
            mo.parent.mkdir(parents=True, exist_ok=True)
            with mo.open("wb") as fh:
                write_mo(fh, catalog)

    def get_source_files(self) -> list[str]:
        return [str(po) for po, _ in self._pairs()]

    def get_outputs(self) -> list[str]:
        return [str(mo) for _, mo in self._pairs()]

    def get_output_mapping(self) -> dict[str, str]:
        return {str(mo): str(po) for po, mo in self._pairs()}


class build_with_catalogs(build):
    sub_commands = [("compile_catalogs", None), *build.sub_commands]  # noqa: RUF012


setup(cmdclass={"build": build_with_catalogs, "compile_catalogs": compile_catalogs})

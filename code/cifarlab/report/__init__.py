"""The generated report: run directories -> pandas tables -> markdown, matplotlib figures.

The report core (build, curves, registry) lives here; each course part keeps its own section
in ``<part>/report_section.py`` and registers it with ``@register_section``. ``sections()``
imports them on first use (see registry.SECTION_MODULES).
"""
from cifarlab.report.registry import register_section, sections

__all__ = ["register_section", "sections"]

from __future__ import annotations

from jinja2 import Environment, PackageLoader, StrictUndefined
from litestar.plugins.jinja import JinjaTemplateEngine
from litestar.template.config import TemplateConfig

from sidecar.identity.model import metadata_text
from sidecar.ui import chart, render


def environment() -> Environment:
    """The dashboard's templates (sidecar/ui/templates). Every one autoescapes, whatever its
    name: a value reaches a page unescaped only through `|safe`, and no template uses it."""
    env = Environment(
        loader=PackageLoader("sidecar.ui", "templates"),
        autoescape=True,
        undefined=StrictUndefined,  # a misspelt name fails the page instead of vanishing
        trim_blocks=True,
        lstrip_blocks=True,
        auto_reload=False,  # the templates ship with the package: no stat per render
    )
    env.filters.update(
        money=render.money,
        dollars=render.dollars,
        count=render.count,
        compact=render.compact,
        percent=render.percent,
        moment=render.moment,
        literal=render.literal,
        metadata_text=metadata_text,
        num=chart.num,
    )
    env.globals.update(
        product=render.PRODUCT,
        query=render.query,
        identity_path=render.identity_path,
    )
    return env


def template_config() -> TemplateConfig[JinjaTemplateEngine]:
    return TemplateConfig(instance=JinjaTemplateEngine.from_environment(environment()))

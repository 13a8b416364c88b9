"""Managing a running mailpipe: what may be done to it (`ops`, the one seam between the outside
and the parts it manages) and the HTTP routes that expose it (`routes`)."""

from mailpipe.admin.ops import (
    AdminMixin,
    AdminOps,
    JobsAdminMixin,
    NotConsumed,
    NoWorkerPool,
    PluginsAdminMixin,
    UnknownPipeline,
    UnknownPlugin,
)

__all__ = [
    "AdminMixin",
    "AdminOps",
    "JobsAdminMixin",
    "NoWorkerPool",
    "NotConsumed",
    "PluginsAdminMixin",
    "UnknownPipeline",
    "UnknownPlugin",
]

"""The built-in data formats, one module each. Importing this package registers them in
:data:`resflow.data.registry.FORMATS` in the order of :data:`BUILTIN` (the order in which
names are listed); a new format module is added to that tuple."""

from importlib import import_module

#: The format modules of this package, imported (so registered) in this order.
BUILTIN: tuple[str, ...] = (
    "toy",
    "digits",
    "idx",
    "cifar10",
    "imagenet",
    "celebahq",
    "folder",
    "npy",
    "uci",
    "matrix",
)

for _module in BUILTIN:
    import_module(f"{__name__}.{_module}")

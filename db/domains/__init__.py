"""The domains: each module here holds one domain's tables, resource declarations, rules, row
policy and custom methods. Importing this package imports every one of them (a new module is
found without a line here), so that the resource registry and the metadata are complete."""
import importlib
import pkgutil

DOMAINS = tuple(
    importlib.import_module(f"{__name__}.{module.name}") for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name)
)

"""The domains: each module holds one domain's tables, resource declarations, rules, row
policy and custom methods. Importing this package imports every one of them, so that the
resource registry and the metadata are complete."""
from db.domains import chat, identity, security, work  # noqa: F401

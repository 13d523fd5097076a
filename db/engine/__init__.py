"""The generic engine: the standard methods of every declared resource, written once.

A domain declares a resource (engine/resource.py ResourceSpec) and the engine serves it: reads
(reads.py, over reading.py's Core rows and statements.py's cached statements), writes (writes.py,
cascade.py; their plan from plans.py), row rules (rules.py), the audit trail (audit.py, through
changes.py's flush for ORM changes), the change log of streamed resources (events.py) and the
tables it owns (tables.py). Nothing here imports a domain (tests/test_architecture.py).
"""

"""Capability-table entries, one module per family; each defines ``INFOS``."""

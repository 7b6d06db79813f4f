"""flowfix: repair and guard the master-flow links of the discovery-flow tables."""

__version__ = "0.1.0"

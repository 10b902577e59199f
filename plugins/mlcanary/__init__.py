"""mlcanary: automated canary analysis and rollback for ML model releases.

This package is the core library: importable and testable without a running Airflow.
"""

__version__ = "0.1.0"

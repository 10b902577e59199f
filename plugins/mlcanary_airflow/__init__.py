"""Airflow glue for mlcanary: hooks, triggers, sensors, operators and the DAG factory.

Laid out like an Airflow provider package; each piece is thin over the core library ``mlcanary``.
"""

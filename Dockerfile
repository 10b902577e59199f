# The image of every Airflow service in docker-compose.yaml: the official Airflow 3.3.2 image with
# requirements.txt (mlcanary's pins, the Celery provider included) and the mlcanary package.
# docker-compose.yaml mounts ./dags, ./plugins and ./include over the copies made here; the copies
# make the image complete on its own (a Kubernetes pod, `docker run`).
FROM apache/airflow:3.3.2

# As the airflow user (the image's default), the docker-stack docs' way: Airflow's own version on the
# command line too, so that a requirements.txt for another version fails here instead of swapping it.
COPY --chown=airflow:0 requirements.txt /requirements.txt
RUN pip install --no-cache-dir "apache-airflow==${AIRFLOW_VERSION}" -r /requirements.txt

# The mlcanary package lives in plugins/ (mlcanary, mlcanary_airflow). An editable install points
# Python at /opt/airflow/plugins (a .pth file), so the mounted plugins/ is the code that runs, and it
# installs the `mlcanary` command. --no-deps: requirements.txt above already has every dependency.
COPY --chown=airflow:0 pyproject.toml /opt/airflow/pyproject.toml
COPY --chown=airflow:0 plugins/ /opt/airflow/plugins/
RUN pip install --no-cache-dir --no-deps -e /opt/airflow

COPY --chown=airflow:0 dags/ /opt/airflow/dags/
COPY --chown=airflow:0 include/ /opt/airflow/include/

# Mount points of the named volumes: a new volume takes this owner and mode.
RUN mkdir -p /opt/airflow/snapshots /opt/airflow/auth && chmod g+rwx /opt/airflow/snapshots /opt/airflow/auth

# Fail the build, not the first task, if the executor or the DAGs' code cannot import (celery 5.7.0
# broke the provider's import: requirements.txt pins 5.6.3). A throwaway AIRFLOW_HOME: no airflow.cfg
# is left in the image.
RUN AIRFLOW_HOME=/tmp/airflow-check python -c "\
import airflow.providers.celery.executors.celery_executor, mlcanary_airflow.dag_factory, mlcanary_airflow.ui" \
    && mlcanary --help > /dev/null \
    && rm -rf /tmp/airflow-check

"""Airflow DAG: run towerstream's daily job every night for the day that just ended.

Copy into Airflow's dags/ folder and set TOWERSTREAM_HOME (the checkout, with its
.venv from `make demo` or `make test`) and TOWERSTREAM_WORKDIR. `{{ ds }}` is the
run's logical date, so a backfill (`airflow dags backfill`) runs each missed day in
order; the job itself skips days already complete and refuses a concurrent run.
"""

import datetime
import os

from airflow import DAG
from airflow.operators.bash import BashOperator

HOME = os.environ.get("TOWERSTREAM_HOME", "/opt/towerstream")
WORKDIR = os.environ.get("TOWERSTREAM_WORKDIR", "/data/towerstream")

with DAG(
    dag_id="towerstream_daily",
    schedule="30 2 * * *",  # 02:30 UTC, once yesterday's logs have landed
    start_date=datetime.datetime(2024, 1, 1),
    catchup=True,
    max_active_runs=1,  # days must train in order
    default_args={"retries": 2, "retry_delay": datetime.timedelta(minutes=15)},
) as dag:
  BashOperator(
      task_id="daily",
      bash_command=(f"cd {HOME} && .venv/bin/python -m pipeline.daily "
                    f"--workdir={WORKDIR} --date={{{{ ds }}}} "
                    "--max_dead_letter_rate=0.01"),
      execution_timeout=datetime.timedelta(hours=6),
  )

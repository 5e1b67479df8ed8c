"""Building the SparkSession the engine (and its tests) run on."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping

from pyspark.sql import SparkSession

from cloud.engine.kinesis import KinesisDataSource

#: JVM options of a local-mode driver (see build_spark_session).
LOCAL_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1"


def build_spark_session(
    master: str | None = "local[*]",
    app_name: str = "sampleflow-engine",
    shuffle_partitions: int = 4,
    ui: bool = False,
    conf: Mapping[str, str] | None = None,
) -> SparkSession:
    """Return a session with the Kinesis source registered.

    ``master`` None leaves it to spark-submit (YARN, EMR).  Python workers
    run the driver's interpreter (``PYSPARK_PYTHON`` defaults to
    ``sys.executable``) so that they import the same installed
    ``sampleflow``; on a cluster, ship the environment (docs/engine.md).
    Shuffle partitions default to 4, not Spark's 200: a micro-batch of a
    few seconds is small, and 200 tasks per stage would dominate it.  A
    local-mode JVM runs with the C1 compiler only (:data:`LOCAL_JAVA_OPTIONS`)
    unless ``conf`` sets ``spark.driver.extraJavaOptions``.
    """
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    if master is not None and master.startswith("local"):
        # Local mode talks to itself only: keep the driver on loopback
        # rather than the address the host name resolves to.
        builder = builder.config("spark.driver.host", "127.0.0.1")
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
        if "spark.driver.extraJavaOptions" not in (conf or {}):
            # The JVM here only moves a few hundred blobs a micro-batch;
            # C2's compiling cost more than it saved: measured 0.53 -> 0.31
            # CPU-s a small micro-batch (all processes) with C1 alone.
            builder = builder.config(
                "spark.driver.extraJavaOptions", LOCAL_JAVA_OPTIONS
            )
    builder = builder.config("spark.sql.shuffle.partitions", str(shuffle_partitions))
    builder = builder.config("spark.ui.enabled", "true" if ui else "false")
    # The console progress bar would interleave with the log lines on stderr.
    builder = builder.config("spark.ui.showConsoleProgress", "false")
    # Arrow moves record batches between the JVM and Python workers.
    builder = builder.config("spark.sql.execution.arrow.pyspark.enabled", "true")
    builder = builder.config("spark.sql.session.timeZone", "UTC")
    for key, value in (conf or {}).items():
        builder = builder.config(key, value)
    spark = builder.getOrCreate()
    spark.dataSource.register(KinesisDataSource)
    return spark

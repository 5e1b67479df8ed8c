"""Building the SparkSession the engine (and its tests) run on."""

from __future__ import annotations

import atexit
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import pyspark
from pyspark.sql import SparkSession

from cloud.engine.kinesis import KinesisDataSource

#: JVM options of a local-mode driver (see build_spark_session).
LOCAL_JAVA_OPTIONS = "-XX:TieredStopAtLevel=1 -XX:+UseSerialGC"


#: Checkpoint file manager of a local-mode session (see build_spark_session).
LOCAL_CHECKPOINT_MANAGER = (
    "org.apache.spark.sql.execution.streaming.checkpointing."
    "FileSystemBasedCheckpointFileManager"
)

#: Where a pip-installed pyspark keeps the zipped copies Spark puts first
#: on its Python workers' PYTHONPATH.
_PIP_SPARK_LIB = Path(pyspark.__file__).resolve().parent / "python" / "lib"

_WORKER_PYTHON_SCRIPT = """#!/bin/sh
# Written by sampleflow (cloud/engine/spark.py) for a local-mode session:
# Spark puts its zipped pyspark and py4j first on a Python worker's path, and
# zipimport compiles every module from source at each worker start (about
# 0.7 CPU-s a streaming source runner).  This interpreter has the same pyspark
# and py4j installed, with compiled caches, so those two entries are dropped.
set -f
lib={lib}
keep=
IFS=:
for entry in $PYTHONPATH; do
    case "$entry" in
        "$lib"/pyspark.zip|"$lib"/py4j-*-src.zip) ;;
        *) keep="${{keep:+$keep:}}$entry" ;;
    esac
done
unset IFS
PYTHONPATH=$keep
export PYTHONPATH
exec {python} "$@"
"""


def local_worker_python() -> str:
    """The interpreter local-mode Python workers run: :data:`sys.executable`
    behind a small ``sh`` script that leaves Spark's zipped pyspark and
    py4j off their path (see :data:`_WORKER_PYTHON_SCRIPT`), or
    :data:`sys.executable` itself when Spark is not this pip-installed
    pyspark (``SPARK_HOME`` elsewhere) or the script cannot be written or
    run (a temporary folder mounted noexec).
    The script lives in a temporary folder removed at exit."""
    home = os.environ.get("SPARK_HOME")
    if home is not None and Path(home).resolve() != _PIP_SPARK_LIB.parents[1]:
        return sys.executable
    if not (_PIP_SPARK_LIB / "pyspark.zip").is_file():
        return sys.executable
    try:
        folder = tempfile.mkdtemp(prefix="sampleflow-pyworker-")
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        script = Path(folder) / "python"
        script.write_text(
            _WORKER_PYTHON_SCRIPT.format(
                lib=shlex.quote(str(_PIP_SPARK_LIB)),
                python=shlex.quote(sys.executable),
            )
        )
        script.chmod(0o755)
        # A temporary folder mounted noexec would fail every Python worker.
        subprocess.run([str(script), "-c", "pass"], check=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return sys.executable
    return str(script)


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
    ``sys.executable``; in local mode through :func:`local_worker_python`)
    so that they import the same installed ``sampleflow``; on a cluster,
    ship the environment (docs/engine.md).
    Shuffle partitions default to 4, not Spark's 200: a micro-batch of a
    few seconds is small, and 200 tasks per stage would dominate it.  A
    local-mode JVM runs with the C1 compiler only and the serial collector
    (:data:`LOCAL_JAVA_OPTIONS`) unless ``conf`` sets
    ``spark.driver.extraJavaOptions``, and writes checkpoints through the
    FileSystem API (:data:`LOCAL_CHECKPOINT_MANAGER`; ``conf`` may
    override it).
    """
    local = master is not None and master.startswith("local")
    if "PYSPARK_PYTHON" not in os.environ:
        os.environ["PYSPARK_PYTHON"] = (
            local_worker_python() if local else sys.executable
        )
    builder = SparkSession.builder.appName(app_name)
    if master is not None:
        builder = builder.master(master)
    if local:
        # Local mode talks to itself only: keep the driver on loopback
        # rather than the address the host name resolves to.
        builder = builder.config("spark.driver.host", "127.0.0.1")
        builder = builder.config("spark.driver.bindAddress", "127.0.0.1")
        if "spark.driver.extraJavaOptions" not in (conf or {}):
            # The JVM here only moves a few hundred blobs a micro-batch;
            # C2's compiling cost more than it saved: measured 0.53 -> 0.31
            # CPU-s a small micro-batch (all processes) with C1 alone.  G1's
            # concurrent marking and parallel GC threads cost 0.3-0.9 CPU-s
            # per million flow rows that the serial collector does not spend
            # (its pauses on this small heap are a few ms).
            builder = builder.config(
                "spark.driver.extraJavaOptions", LOCAL_JAVA_OPTIONS
            )
        # Spark's default checkpoint manager goes through Hadoop's
        # FileContext, which, without Hadoop's native library (pip's pyspark
        # has none), runs `readlink` as a child process for every path it
        # looks at: some 15 processes a micro-batch, 0.07 CPU-s measured.  The
        # FileSystem manager writes a temporary file and renames it, atomic
        # on a local disk (and what Spark falls back to for S3 anyway).
        builder = builder.config(
            "spark.sql.streaming.checkpointFileManagerClass", LOCAL_CHECKPOINT_MANAGER
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

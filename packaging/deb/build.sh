#!/bin/sh
# Build sampleflow-relay_<version>_<arch>.deb into dist/ (see build.py).
# Needs: dpkg-deb, a Debian python3 with venv (python3-venv), and the
# package registries (pip) at build time.  Arguments go to build.py.
set -eu
exec "${SAMPLEFLOW_DEB_PYTHON:-/usr/bin/python3}" "$(dirname "$0")/build.py" "$@"

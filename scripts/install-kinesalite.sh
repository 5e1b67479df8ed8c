#!/usr/bin/env bash
# Installs kinesalite (a local Kinesis server whose SplitShard/MergeShards
# keep the parent shard readable, as AWS does) into .cache/kinesalite, for
# the resharding tests of the Kinesis source.  Without node/npm it says so
# and exits 0: those tests then skip with the same reason.
set -euo pipefail
cd "$(dirname "$0")/.."
VERSION="3.3.3"
BIN=".cache/kinesalite/node_modules/.bin/kinesalite"
if ! command -v npm >/dev/null 2>&1 || ! command -v node >/dev/null 2>&1; then
    echo "install-kinesalite: node/npm not found; resharding tests will skip"
    exit 0
fi
if [ -x "$BIN" ] && grep -q "\"version\": \"$VERSION\"" \
        .cache/kinesalite/node_modules/kinesalite/package.json 2>/dev/null; then
    exit 0
fi
npm install --prefix .cache/kinesalite --no-audit --no-fund --silent "kinesalite@$VERSION"

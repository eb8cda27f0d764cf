#!/usr/bin/env bash
# Lints the wire contract and checks it against the last released proto (buf.yaml says which rules).
#   ./scripts/buf.sh      buf lint, then buf breaking against the newest git tag proto-v*, else against the
#                         newest release in protos/releases.txt
# buf comes from npm (@bufbuild/buf, pinned below) into .tools/buf (git-ignored) on first use; without npm,
# or when the install fails, it warns and skips (./scripts/test.sh calls it only when npx is present).
set -euo pipefail
cd "$(dirname "$0")/.."
BUF_VERSION=1.75.0
TOOLS=.tools/buf
BUF="$TOOLS/node_modules/.bin/buf"
if [ ! -x "$BUF" ] || [ "$("$BUF" --version 2>/dev/null)" != "$BUF_VERSION" ]; then
  if ! npm install --prefix "$TOOLS" --no-save --no-audit --no-fund --loglevel=error "@bufbuild/buf@$BUF_VERSION"; then
    echo "[buf] warning: npm install @bufbuild/buf@$BUF_VERSION failed: buf lint/breaking skipped" >&2
    exit 0
  fi
fi
"$BUF" lint
echo "[buf] lint: ok (STANDARD, exceptions in buf.yaml)"
GIT_DIR_ABS="$(cd "$(git rev-parse --git-common-dir)" && pwd)"  # works in a worktree too
TAG="$(git tag --list 'proto-v*' --sort=-version:refname | head -n1)"
if [ -n "$TAG" ]; then
  "$BUF" breaking --against "$GIT_DIR_ABS#tag=$TAG,subdir=protos"
  echo "[buf] breaking: ok (wire-compatible with $TAG)"
  exit 0
fi
# No tags in this clone: the newest release recorded in protos/releases.txt whose commit is in the history.
read -r NAME COMMIT < <(grep -v '^#' protos/releases.txt | tac | while read -r n c; do
  if git cat-file -e "$c^{commit}" 2>/dev/null; then echo "$n $c"; break; fi; done)
if [ -z "${COMMIT:-}" ]; then
  echo "[buf] warning: no proto-v* tag and no release of protos/releases.txt in this clone's history (a shallow" \
       "clone?): buf breaking skipped" >&2
  exit 0
fi
"$BUF" breaking --against "$GIT_DIR_ABS#ref=$COMMIT,subdir=protos"
echo "[buf] breaking: ok (wire-compatible with $NAME, commit ${COMMIT:0:12})"

#!/usr/bin/env bash
# Refresh the MapLibre GL JS files vendored into the web map (pipeline/serve/static/maplibre/)
# from the npm registry: no CDN at run time, since map users often sit on intranets.
#
#   infra/vendor-maplibre.sh [VERSION]      (default: the version in VERSION beside the files)
#
# Copies dist/maplibre-gl.js, dist/maplibre-gl.css and LICENSE.txt of the npm package and records
# the version and the tarball's sha512 integrity.  The 5.x line is used: it ships the single-file
# UMD build (worker inlined); 6.x ships only ES modules with a separate worker file.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
DEST=$ROOT/pipeline/serve/static/maplibre
VERSION=${1:-$(cat "$DEST/VERSION" 2>/dev/null | head -1)}
[ -n "$VERSION" ] || { echo "usage: $0 VERSION (e.g. 5.24.1)" >&2; exit 2; }
command -v npm >/dev/null || { echo "$0: npm is needed (apt-get install -y npm)" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "maplibre-gl@$VERSION" >/dev/null)
tarball=$(ls "$work"/maplibre-gl-*.tgz)
tar -xzf "$tarball" -C "$work" package/dist/maplibre-gl.js package/dist/maplibre-gl.css package/LICENSE.txt
mkdir -p "$DEST"
cp "$work/package/dist/maplibre-gl.js" "$work/package/dist/maplibre-gl.css" "$DEST/"
cp "$work/package/LICENSE.txt" "$DEST/LICENSE.txt"
integrity=$(cd "$work" && npm view "maplibre-gl@$VERSION" dist.integrity)
printf '%s\n%s\n' "$VERSION" "$integrity" > "$DEST/VERSION"
echo "vendored maplibre-gl $VERSION into ${DEST#$ROOT/}"

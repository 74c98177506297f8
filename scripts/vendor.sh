#!/bin/sh
# Copy the pinned front-end packages (package.json + package-lock.json) into
# static/vendor/, minified files and their licenses. Run after changing a version,
# then commit static/vendor/: running the portal needs no Node.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cp "$root/package.json" "$work/"
if [ -f "$root/package-lock.json" ]; then
  cp "$root/package-lock.json" "$work/"
  (cd "$work" && npm ci --ignore-scripts --no-audit --no-fund)
else
  (cd "$work" && npm install --ignore-scripts --no-audit --no-fund)
  cp "$work/package-lock.json" "$root/"
fi
vendor="$root/static/vendor"
rm -rf "$vendor"
mkdir -p "$vendor"
modules="$work/node_modules"
cp "$modules/htmx.org/dist/htmx.min.js" "$vendor/htmx.min.js"
cp "$modules/htmx.org/LICENSE" "$vendor/htmx.LICENSE"
cp "$modules/chart.js/dist/chart.umd.min.js" "$vendor/chart.umd.min.js"
cp "$modules/chart.js/LICENSE.md" "$vendor/chart.js.LICENSE.md"
node -e 'const lock = require(process.argv[1]);
for (const name of ["htmx.org", "chart.js"]) console.log(name, lock.packages["node_modules/" + name].version);' \
  "$root/package-lock.json" > "$vendor/VERSIONS"
echo "vendored into $vendor:"; cat "$vendor/VERSIONS"

#!/usr/bin/env bash
# Sets up (Debian packages, npm dependencies) and runs every check: lint, type-check, all tests.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh --test
# The VM tests' guest images (debian-dev, then cloud-init-test), built beside lint and type-check,
# which keep one core busy: otherwise the first VM tests build them while the other VM tests wait.
# A test that needs an image waits on its build's lock; should this build fail, the test builds it
# again and says why. Its output: $TMPDIR/orchard-test-images.log.
node_modules/node/bin/node --input-type=module -e "
  const { buildDebianDev } = await import('./src/worker/images.ts');
  const { TEST_IMAGES, buildCloudInitTestImage } = await import('./test/helpers.ts');
  await buildDebianDev(TEST_IMAGES, (step) => console.log(step));
  console.log(await buildCloudInitTestImage());
" > "${TMPDIR:-/tmp}/orchard-test-images.log" 2>&1 &
exec npm test

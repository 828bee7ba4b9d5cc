// The official GitHub Actions cache client, @actions/cache (the version pinned in
// package.json), run by the tests against the stand-in of GitHub's cache service
// (tests/gha_standin.py), so that the stand-in is proven to speak the protocol GitHub's
// own client speaks (cache service v2: set ACTIONS_CACHE_SERVICE_V2, ACTIONS_RESULTS_URL
// and ACTIONS_RUNTIME_TOKEN; GITHUB_SERVER_URL unset or https://github.com).
//
//   node gha_client.js '[{"op": "save", "key": K, "paths": [P...], "cwd": DIR}, ...]'
//
// runs each operation in turn, in DIR (the workspace: GITHUB_WORKSPACE), and prints one
// JSON line: a result per operation. "save" gives {"cacheId": N} (saveCache swallows its
// errors and returns -1: that is a failure here); "restore" (also "restoreKeys": [...])
// gives {"matchedKey": K or null}; "version" gives {"version": V, "compression": C}, the
// version the client sends for those paths. Exit status 1 on any failure.
'use strict';

const cache = require('@actions/cache');
const utils = require('@actions/cache/lib/internal/cacheUtils');

async function run(op) {
  process.chdir(op.cwd);
  process.env.GITHUB_WORKSPACE = op.cwd;
  switch (op.op) {
    case 'save': {
      const cacheId = await cache.saveCache(op.paths, op.key);
      if (cacheId === -1) throw new Error(`saveCache(${op.key}) failed (see above)`);
      return { cacheId };
    }
    case 'restore': {
      const matchedKey = await cache.restoreCache(op.paths, op.key, op.restoreKeys || []);
      return { matchedKey: matchedKey === undefined ? null : matchedKey };
    }
    case 'version': {
      const compression = await utils.getCompressionMethod();
      return { version: utils.getCacheVersion(op.paths, compression), compression };
    }
    default:
      throw new Error(`unknown operation ${op.op}`);
  }
}

async function main() {
  const results = [];
  for (const op of JSON.parse(process.argv[2])) {
    results.push(await run(op));
  }
  process.stdout.write(`${JSON.stringify(results)}\n`);
}

main().catch((error) => {
  process.stderr.write(`gha_client.js: ${error.stack || error}\n`);
  process.exit(1);
});

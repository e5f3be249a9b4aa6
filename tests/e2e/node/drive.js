// Drives versionstore with the official Node SDK, unchanged. CLOUDINARY_URL (with
// upload_prefix=http://...) must be set before the SDK is required: the Node SDK picks
// http or https once, at load time. Prints one JSON object with what each call returned;
// tests/e2e/test_node_sdk.py checks it.
'use strict';
const fs = require('fs');
const http = require('http');
const os = require('os');
const path = require('path');
const crypto = require('crypto');
const cloudinary = require('cloudinary').v2;

function fetchBytes(url, headers = {}) {
  return new Promise((resolve, reject) => {
    http.get(url, { headers }, (res) => {
      const chunks = [];
      res.on('data', (c) => chunks.push(c));
      res.on('end', () => resolve({ status: res.statusCode, body: Buffer.concat(chunks), headers: res.headers }));
    }).on('error', reject);
  });
}

async function failure(promise) {
  try {
    await promise;
    return null;
  } catch (err) {
    const error = err.error || err;
    return { message: error.message, http_code: error.http_code };
  }
}

async function main() {
  const out = {};
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'vs-node-'));
  const one = path.join(dir, 'one.bin');
  const two = path.join(dir, 'two.bin');
  fs.writeFileSync(one, crypto.randomBytes(3000));
  fs.writeFileSync(two, crypto.randomBytes(5000));
  const pid = 'node/sample';

  out.ping = await cloudinary.api.ping();
  const first = await cloudinary.uploader.upload(one, { public_id: pid, resource_type: 'raw', backup: true, tags: ['t1', 't2'] });
  const second = await cloudinary.uploader.upload(two, { public_id: pid, resource_type: 'raw', backup: true, overwrite: true });
  out.first = first;
  out.second = second;
  out.resource = await cloudinary.api.resource(pid, { resource_type: 'raw', versions: true });
  out.by_asset_id = await cloudinary.api.resource_by_asset_id(first.asset_id, { versions: true });

  const url = cloudinary.utils.download_backedup_asset(first.asset_id, first.version_id);
  const downloaded = await fetchBytes(url);
  out.download = { status: downloaded.status, same: downloaded.body.equals(fs.readFileSync(one)) };
  const ranged = await fetchBytes(url, { Range: 'bytes=0-9' });
  out.download_range = { status: ranged.status, same: ranged.body.equals(fs.readFileSync(one).subarray(0, 10)) };

  out.update = await cloudinary.api.update(pid, { resource_type: 'raw', tags: 'x,y' });
  out.add_tag = await cloudinary.uploader.add_tag('z', [pid], { resource_type: 'raw' });
  out.list = await cloudinary.api.resources({ resource_type: 'raw', type: 'upload', prefix: 'node/' });
  out.delete = await cloudinary.api.delete_resources([pid, 'node/missing'], { resource_type: 'raw' });
  out.placeholder = await cloudinary.api.resource(pid, { resource_type: 'raw' });
  out.search = await cloudinary.search.expression('status=deleted AND public_id=node/*').sort_by('public_id', 'asc').max_results(10).execute();
  out.restore = await cloudinary.api.restore([pid], { resource_type: 'raw', versions: [first.version_id] });
  out.delete_versions = await cloudinary.api.delete_backed_up_assets(first.asset_id, [second.version_id]);
  out.delete_current = await cloudinary.api.delete_backed_up_assets(first.asset_id, [out.restore[pid].version_id]);
  out.after = await cloudinary.api.resource(pid, { resource_type: 'raw', versions: true });

  await cloudinary.uploader.upload(two, { public_id: 'node/other', resource_type: 'raw' });
  out.rename_refused = await failure(cloudinary.uploader.rename(pid, 'node/other', { resource_type: 'raw' }));
  out.rename = await cloudinary.uploader.rename(pid, 'node/renamed', { resource_type: 'raw' });
  out.destroy = await cloudinary.uploader.destroy('node/renamed', { resource_type: 'raw' });
  out.destroy_missing = await cloudinary.uploader.destroy('node/never', { resource_type: 'raw' });
  out.not_found = await failure(cloudinary.api.resource('node/never', { resource_type: 'raw' }));

  const big = path.join(dir, 'big.bin');
  fs.writeFileSync(big, crypto.randomBytes(12 * 1024 * 1024 + 123));
  out.large = await new Promise((resolve, reject) => {
    cloudinary.uploader.upload_large(big, { public_id: 'node/big', chunk_size: 5 * 1024 * 1024 }, (err, res) => (err ? reject(err) : resolve(res)));
  });
  const bigDownload = await fetchBytes(cloudinary.utils.download_backedup_asset(out.large.asset_id, out.large.version_id));
  out.large_download = { status: bigDownload.status, same: bigDownload.body.equals(fs.readFileSync(big)) };

  fs.rmSync(dir, { recursive: true, force: true });
  process.stdout.write(JSON.stringify(out));
}

main().catch((err) => {
  process.stderr.write(`${err && err.stack ? err.stack : JSON.stringify(err)}\n`);
  process.exit(1);
});

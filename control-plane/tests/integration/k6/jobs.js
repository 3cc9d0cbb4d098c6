// k6 load check of one-shot jobs through the control plane.
//
//   make k6                       (against a running `make run-local`)
//   BASE_URL=http://127.0.0.1:8080 TOKEN=... k6 run jobs.js
//
// Each iteration submits a job with a fresh Idempotency-Key, replays it once
// (must be the same job, marked as a replay), then long-polls its result.
// Loopback only; bounded by VUS and DURATION.
import http from 'k6/http';
import { check, fail } from 'k6';
import { Counter, Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const TOKEN = __ENV.TOKEN || fail('set TOKEN (control-plane token --tenant T --roles agent)');
const jobLatency = new Trend('job_submit_to_result', true);
const replays = new Counter('idempotent_replays');

export const options = {
  vus: Number(__ENV.VUS || 4),
  duration: __ENV.DURATION || '20s',
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    job_submit_to_result: ['p(50)<500'],
  },
};

const headers = (extra) =>
  Object.assign({ Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' }, extra || {});

export default function () {
  const key = `k6-${__VU}-${__ITER}-${Date.now()}`;
  const body = JSON.stringify({ code: `${__VU} * ${__ITER}`, labels: { source: 'k6' } });
  const started = Date.now();
  const submit = http.post(`${BASE}/v1/jobs`, body, { headers: headers({ 'Idempotency-Key': key }) });
  if (!check(submit, { 'submit 202': (r) => r.status === 202 })) return;
  const jobId = submit.json('jobId');

  const again = http.post(`${BASE}/v1/jobs`, body, { headers: headers({ 'Idempotency-Key': key }) });
  check(again, {
    'replay 202': (r) => r.status === 202,
    'replay is the same job': (r) => r.json('jobId') === jobId,
    'replay is marked': (r) => r.headers['Idempotent-Replayed'] === 'true',
  }) && replays.add(1);

  let job;
  for (let i = 0; i < 10; i++) {
    const r = http.get(`${BASE}/v1/jobs/${jobId}?waitMs=5000`, { headers: headers() });
    job = r.json();
    if (['succeeded', 'failed', 'cancelled'].includes(job.status)) break;
  }
  jobLatency.add(Date.now() - started);
  check(job, {
    'job succeeded': (j) => j.status === 'succeeded',
    'job result': (j) => j.output && j.output.result === __VU * __ITER,
  });
}

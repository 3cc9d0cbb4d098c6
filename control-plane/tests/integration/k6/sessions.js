// k6 load check of sessions through the control plane.
//
//   make k6                       (against a running `make run-local`)
//   BASE_URL=http://127.0.0.1:8080 TOKEN=... k6 run sessions.js
//
// Each VU opens a session, runs STEPS steps that build on each other's
// state, reads the step history, and deletes the session. Loopback only;
// bounded by VUS and ITERATIONS.
import http from 'k6/http';
import { check, fail } from 'k6';
import { Trend } from 'k6/metrics';

const BASE = __ENV.BASE_URL || 'http://127.0.0.1:8080';
const TOKEN = __ENV.TOKEN || fail('set TOKEN (control-plane token --tenant T --roles agent)');
const STEPS = Number(__ENV.STEPS || 20);
const stepLatency = new Trend('step_latency', true);

export const options = {
  vus: Number(__ENV.VUS || 2),
  iterations: Number(__ENV.ITERATIONS || 6),
  thresholds: {
    http_req_failed: ['rate<0.01'],
    checks: ['rate>0.99'],
    step_latency: ['p(50)<50'],
  },
};

const params = { headers: { Authorization: `Bearer ${TOKEN}`, 'Content-Type': 'application/json' } };

export default function () {
  const created = http.post(`${BASE}/v1/sessions`, JSON.stringify({ ttlSeconds: 120 }), params);
  if (!check(created, { 'session 201': (r) => r.status === 201 })) return;
  const id = created.json('sessionId');
  http.post(`${BASE}/v1/sessions/${id}/steps`, JSON.stringify({ code: 'n = 0' }), params);
  for (let i = 1; i <= STEPS; i++) {
    const r = http.post(`${BASE}/v1/sessions/${id}/steps`, JSON.stringify({ code: 'n += 1\nn' }), params);
    stepLatency.add(r.timings.duration);
    check(r, {
      'step 200': (x) => x.status === 200,
      'state persists': (x) => x.json('result') === i,
    });
  }
  const history = http.get(`${BASE}/v1/sessions/${id}/steps`, params);
  check(history, { 'history complete': (r) => r.json('steps').length === STEPS + 1 });
  const deleted = http.del(`${BASE}/v1/sessions/${id}`, null, params);
  check(deleted, { 'deleted 204': (r) => r.status === 204 });
}

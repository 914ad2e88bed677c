// Checks deploy/k8s without a cluster (none is reachable from CI):
//  1. every object against its Kubernetes API schema: types, enums and required fields
//     (kubernetes-models), unknown fields (the models of @kubernetes/client-node, as
//     kubectl --validate=strict would), the LeaderWorkerSet against the fields of its CRD
//     (leaderworkerset-v1.schema.json) with its pod templates as core/v1 PodTemplateSpecs;
//  2. that the objects fit together and fit Joule: every JOULE_* variable is a setting the
//     binary has (from its --help), probes hit /health or /ready on a declared port, Services
//     and monitors select the pods they mean, the coordinator waits for as many workers as
//     the group has, the workers reach the coordinator's Service.
//   node check_manifests.mjs MANIFEST_DIR COORDINATOR_HELP_FILE WORKER_HELP_FILE
import { readFileSync, readdirSync } from "node:fs";
import { join } from "node:path";
import { parseAllDocuments } from "yaml";
import Ajv from "ajv";
import * as k8s from "@kubernetes/client-node";
import { Deployment } from "kubernetes-models/apps/v1/Deployment";
import { Service } from "kubernetes-models/v1/Service";
import { PodTemplateSpec } from "kubernetes-models/v1/PodTemplateSpec";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";
import { PodMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PodMonitor";

const [dir, coordinatorHelpFile, workerHelpFile] = process.argv.slice(2);
const errors = [];
const fail = (where, what) => errors.push(`${where}: ${what}`);

// ---- 1. schemas ----
const models = {
  "apps/v1/Deployment": [Deployment, "V1Deployment"],
  "v1/Service": [Service, "V1Service"],
  "monitoring.coreos.com/v1/ServiceMonitor": [ServiceMonitor, null],
  "monitoring.coreos.com/v1/PodMonitor": [PodMonitor, null],
};
const lwsSchema = JSON.parse(readFileSync(new URL("./leaderworkerset-v1.schema.json", import.meta.url)));
const validateLws = new Ajv({ allErrors: true, strict: false }).compile(lwsSchema);

// Unknown fields: walk the object along the client's attribute maps.
function strictFields(value, type, path) {
  if (value === null || value === undefined) return;
  const array = /^Array<(.+)>$/.exec(type);
  if (array) return value.forEach?.((v, i) => strictFields(v, array[1], `${path}[${i}]`));
  const map = /^\{ \[key: string\]: (.+); \}$/.exec(type);
  if (map) return Object.entries(value).forEach(([k, v]) => strictFields(v, map[1], `${path}.${k}`));
  const model = k8s[type];
  if (typeof model?.getAttributeTypeMap !== "function") return;  // string, number, IntOrString...
  const attributes = new Map(model.getAttributeTypeMap().map((a) => [a.baseName, a.type]));
  for (const [k, v] of Object.entries(value)) {
    if (!attributes.has(k)) fail(path, `unknown field "${k}" (${type})`);
    else strictFields(v, attributes.get(k), `${path}.${k}`);
  }
}

function checkSchema(obj, where) {
  const key = `${obj.apiVersion}/${obj.kind}`;
  if (key === "leaderworkerset.x-k8s.io/v1/LeaderWorkerSet") {
    if (!validateLws(obj)) validateLws.errors.forEach((e) => fail(where, `${e.instancePath} ${e.message}`));
    for (const t of ["leaderTemplate", "workerTemplate"]) {
      const template = obj.spec?.leaderWorkerTemplate?.[t];
      if (template === undefined) continue;
      try { new PodTemplateSpec(template).validate(); } catch (e) { fail(`${where} ${t}`, e.message); }
      strictFields(template, "V1PodTemplateSpec", `${where} ${t}`);
    }
    return;
  }
  const model = models[key];
  if (!model) return fail(where, `no schema for ${key}`);
  try { new model[0](obj).validate(); } catch (e) { fail(where, e.message); }
  if (model[1]) strictFields(obj, model[1], where);
}

// ---- load ----
const kustomization = parseAllDocuments(readFileSync(join(dir, "kustomization.yaml"), "utf8"))[0].toJS();
const files = readdirSync(dir).filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml");
for (const f of files) if (!kustomization.resources.includes(f)) fail("kustomization.yaml", `does not list ${f}`);
for (const f of kustomization.resources) if (!files.includes(f)) fail("kustomization.yaml", `lists missing ${f}`);
const objects = [];
for (const f of files) {
  for (const doc of parseAllDocuments(readFileSync(join(dir, f), "utf8"))) {
    if (doc.errors.length) { fail(f, doc.errors[0].message); continue; }
    const obj = doc.toJS();
    const where = `${f} ${obj.kind}/${obj.metadata?.name}`;
    checkSchema(obj, where);
    objects.push({ obj, where });
  }
}
const find = (kind) => objects.filter((o) => o.obj.kind === kind);
const one = (kind) => {
  const found = find(kind);
  if (found.length !== 1) fail("manifests", `expected one ${kind}, found ${found.length}`);
  return found[0]?.obj;
};

// ---- 2. consistency ----
// The settings a binary has: "--flag" lines of its --help, each also PREFIX_FLAG in the
// environment; and the JOULE_* variables its help names (TLS, token).
function settings(helpFile, prefix) {
  const help = readFileSync(helpFile, "utf8");
  const names = new Set([...help.matchAll(/^\s+--([a-z0-9-]+)/gm)].map((m) => prefix + m[1].toUpperCase().replaceAll("-", "_")));
  for (const m of help.matchAll(/\bJOULE_[A-Z0-9_]+/g)) names.add(m[0]);
  if (names.size < 10) fail(helpFile, "does not look like --help output");
  return names;
}
const coordinatorSettings = settings(coordinatorHelpFile, "JOULE_COORDINATOR_");
const workerSettings = settings(workerHelpFile, "JOULE_WORKER_");
const labelsMatch = (selector, labels) => Object.entries(selector ?? {}).every(([k, v]) => labels?.[k] === v);
const envOf = (c) => Object.fromEntries((c.env ?? []).map((e) => [e.name, e.value ?? e.valueFrom]));

function checkPod(spec, where, known) {
  for (const c of spec.containers ?? []) {
    const ports = new Set((c.ports ?? []).map((p) => p.name));
    for (const e of c.env ?? []) {
      if (e.name.startsWith("JOULE_") && !known.has(e.name)) fail(`${where} ${c.name}`, `${e.name} is no setting of ${c.command?.[0]}`);
    }
    for (const probe of ["startupProbe", "readinessProbe", "livenessProbe"]) {
      const get = c[probe]?.httpGet;
      if (!get) { fail(`${where} ${c.name}`, `no ${probe} over HTTP`); continue; }
      if (!["/health", "/ready"].includes(get.path)) fail(`${where} ${c.name}`, `${probe} on ${get.path}`);
      if (!ports.has(get.port)) fail(`${where} ${c.name}`, `${probe} on undeclared port ${get.port}`);
    }
    const volumes = new Set((spec.volumes ?? []).map((v) => v.name));
    for (const m of c.volumeMounts ?? []) if (!volumes.has(m.name)) fail(`${where} ${c.name}`, `mounts missing volume ${m.name}`);
  }
  return spec.containers?.[0];
}

const deployment = one("Deployment");
const service = one("Service");
const lws = one("LeaderWorkerSet");
if (deployment && service && lws) {
  const coordinator = checkPod(deployment.spec.template.spec, "Deployment", coordinatorSettings);
  const workerTemplate = lws.spec.leaderWorkerTemplate.workerTemplate;
  const worker = checkPod(workerTemplate.spec, "LeaderWorkerSet", workerSettings);
  if (lws.spec.leaderWorkerTemplate.leaderTemplate) fail("LeaderWorkerSet", "the leader must be a worker like the others");
  const cEnv = envOf(coordinator), wEnv = envOf(worker);
  const size = lws.spec.leaderWorkerTemplate.size ?? 1;
  if (Number(cEnv.JOULE_COORDINATOR_WORKERS) !== size) {
    fail("coordinator", `JOULE_COORDINATOR_WORKERS=${cEnv.JOULE_COORDINATOR_WORKERS}, the group has ${size} workers`);
  }
  if ((lws.spec.replicas ?? 1) !== 1) fail("LeaderWorkerSet", "one group per coordinator (replicas: 1)");
  // The worker's rank: the LWS worker-index label of its pod.
  const rank = wEnv.JOULE_WORKER_RANK?.fieldRef?.fieldPath ?? "";
  if (!rank.includes("leaderworkerset.sigs.k8s.io/worker-index")) fail("worker", "JOULE_WORKER_RANK is not the LWS worker index");
  // One GPU per worker, and the worker uses it.
  const gpus = worker.resources?.limits?.["nvidia.com/gpu"];
  if (gpus !== 1 || wEnv.JOULE_WORKER_DEVICE !== "cuda:0") fail("worker", `one GPU per worker: limit ${gpus}, device ${wEnv.JOULE_WORKER_DEVICE}`);
  // The Service selects the coordinator's pod and exposes its ports by name.
  if (!labelsMatch(service.spec.selector, deployment.spec.template.metadata.labels)) fail("Service", "does not select the coordinator");
  if (!labelsMatch(deployment.spec.selector.matchLabels, deployment.spec.template.metadata.labels)) fail("Deployment", "selector misses its pods");
  const cPorts = new Map(coordinator.ports.map((p) => [p.name, p.containerPort]));
  for (const p of service.spec.ports) if (!cPorts.has(p.targetPort)) fail("Service", `targets undeclared port ${p.targetPort}`);
  if (String(cPorts.get("http")) !== cEnv.JOULE_COORDINATOR_HTTP_PORT) fail("coordinator", "http port and JOULE_COORDINATOR_HTTP_PORT differ");
  if (String(cPorts.get("grpc")) !== cEnv.JOULE_COORDINATOR_PORT) fail("coordinator", "grpc port and JOULE_COORDINATOR_PORT differ");
  const grpc = service.spec.ports.find((p) => p.name === "grpc");
  if (wEnv.JOULE_WORKER_COORDINATOR !== `${service.metadata.name}:${grpc?.port}`) {
    fail("worker", `JOULE_WORKER_COORDINATOR=${wEnv.JOULE_WORKER_COORDINATOR}, the Service is ${service.metadata.name}:${grpc?.port}`);
  }
  const wPorts = new Map(worker.ports.map((p) => [p.name, p.containerPort]));
  if (String(wPorts.get("metrics")) !== wEnv.JOULE_WORKER_METRICS_PORT) fail("worker", "metrics port and JOULE_WORKER_METRICS_PORT differ");
  if (String(wPorts.get("grpc")) !== wEnv.JOULE_WORKER_PORT) fail("worker", "grpc port and JOULE_WORKER_PORT differ");
  // Monitors: the ServiceMonitor scrapes the Service's http port, the PodMonitor the workers.
  for (const { obj } of find("ServiceMonitor")) {
    if (!labelsMatch(obj.spec.selector.matchLabels, service.metadata.labels)) fail("ServiceMonitor", "does not select the Service");
    for (const e of obj.spec.endpoints) if (!service.spec.ports.some((p) => p.name === e.port)) fail("ServiceMonitor", `no Service port ${e.port}`);
  }
  for (const { obj } of find("PodMonitor")) {
    if (!labelsMatch(obj.spec.selector.matchLabels, workerTemplate.metadata.labels)) fail("PodMonitor", "does not select the workers");
    for (const e of obj.spec.podMetricsEndpoints) if (!wPorts.has(e.port)) fail("PodMonitor", `no worker port ${e.port}`);
  }
  if (find("ServiceMonitor").length + find("PodMonitor").length < 2) fail("manifests", "expected a ServiceMonitor and a PodMonitor");
}

if (errors.length) {
  for (const e of errors) console.error(`FAIL ${e}`);
  process.exit(1);
}
console.log(`PASS: ${objects.length} objects in ${files.length} files: schemas and consistency`);

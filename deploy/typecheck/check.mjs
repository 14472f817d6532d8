// Checks what deploy/ ships that no Kubernetes schema covers:
//   - the Grafana dashboard JSON against the Dashboard type of @grafana/schema;
//   - the ServiceMonitor and PrometheusRule against the prometheus-operator
//     models of @kubernetes-models/prometheus-operator: their JSON-schema
//     validators (patterns, enums, required fields) and their TypeScript
//     types (unknown fields).
// Each document becomes an object literal typed as its schema type in gen/
// (a typed literal, unlike an imported .json file, keeps string literals
// narrow and rejects unknown properties), and `tsc --strict` checks them.
// Run: npm ci && npm run check (exit 0 = all good).

import { execFileSync } from "node:child_process";
import { mkdirSync, readdirSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { dirname, join, relative } from "node:path";
import { fileURLToPath } from "node:url";

import yaml from "js-yaml";
import { PrometheusRule } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/PrometheusRule";
import { ServiceMonitor } from "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/ServiceMonitor";

const here = dirname(fileURLToPath(import.meta.url));
const deploy = join(here, "..");
const gen = join(here, "gen");
const models = {
  ServiceMonitor: { model: ServiceMonitor, type: "IServiceMonitor" },
  PrometheusRule: { model: PrometheusRule, type: "IPrometheusRule" },
};

let failures = 0;
rmSync(gen, { recursive: true, force: true });
mkdirSync(gen);

const dashboards = readdirSync(join(deploy, "grafana")).filter((f) => f.endsWith(".json"));
for (const [i, file] of dashboards.entries()) {
  const json = JSON.parse(readFileSync(join(deploy, "grafana", file), "utf8"));
  writeFileSync(
    join(gen, `dashboard${i}.ts`),
    `// ${file}\nimport type { Dashboard } from "@grafana/schema";\n` +
      `export const dashboard: Dashboard = ${JSON.stringify(json, null, 2)};\n`,
  );
  console.log(`dashboard ${file}: ${json.panels.length} panels`);
}

const crdDir = join(deploy, "prometheus-operator");
const crdFiles = readdirSync(crdDir).filter((f) => f.endsWith(".yaml") && f !== "kustomization.yaml");
let n = 0;
for (const file of crdFiles) {
  const path = join(crdDir, file);
  for (const doc of yaml.loadAll(readFileSync(path, "utf8"))) {
    if (doc === null) continue;
    const where = `${relative(deploy, path)} ${doc.kind}/${doc.metadata?.name}`;
    const m = models[doc.kind];
    if (!m || doc.apiVersion !== "monitoring.coreos.com/v1") {
      console.error(`${where}: no schema for ${doc.apiVersion} ${doc.kind}`);
      failures++;
      continue;
    }
    try {
      new m.model(doc).validate();
      console.log(`${where}: schema ok`);
    } catch (e) {
      console.error(`${where}: ${e.message}`);
      failures++;
    }
    const mod = `@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1/${doc.kind}`;
    writeFileSync(
      join(gen, `crd${n++}.ts`),
      `// ${where}\nimport type { ${m.type} } from "${mod}";\n` +
        `export const resource: ${m.type} = ${JSON.stringify(doc, null, 2)};\n`,
    );
  }
}

const tsc = join(here, "node_modules", "typescript", "bin", "tsc");
try {
  execFileSync(process.execPath, [tsc, "--strict", "-p", join(here, "tsconfig.json")], { stdio: "inherit" });
  console.log(`tsc --strict: ${dashboards.length} dashboards and ${n} prometheus-operator resources type-check`);
} catch {
  console.error("tsc --strict failed (see above; line numbers are in gen/)");
  failures++;
}
process.exit(failures === 0 ? 0 : 1);

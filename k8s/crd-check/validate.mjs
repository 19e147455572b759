// Validates prometheus-operator objects (monitoring.coreos.com/v1) that the Kubernetes core
// schemas of kubernetes-validate do not cover. Run by k8s/check.py from the directory where
// `npm ci` installed this package.json:
//
//   node validate.mjs objects.json
//
// objects.json is a JSON list of {"source": "...", "object": {...}}. Two passes:
//  1. the models' generated ajv validators (from the operator's Go types: field types,
//     patterns such as durations, required fields, enums);
//  2. TypeScript's excess-property check over the same objects typed with the models'
//     interfaces, which rejects any field the CRD does not have (what ajv lets through):
//     the strict half. Exit status 0 only if both passes accept every object.
import { readFileSync, writeFileSync } from "node:fs";
import { execFileSync } from "node:child_process";
import { createRequire } from "node:module";
import path from "node:path";

const MODELS = "@kubernetes-models/prometheus-operator/monitoring.coreos.com/v1";
const items = JSON.parse(readFileSync(process.argv[2], "utf8"));
let failed = 0;

const kinds = [...new Set(items.map((i) => i.object.kind))];
const models = {};
for (const kind of kinds) {
  models[kind] = (await import(`${MODELS}/${kind}`))[kind];
}

for (const { source, object } of items) {
  if (object.apiVersion !== "monitoring.coreos.com/v1") {
    console.log(`FAIL ${source}: apiVersion ${object.apiVersion}, expected monitoring.coreos.com/v1`);
    failed++;
    continue;
  }
  try {
    new models[object.kind](object).validate();
    console.log(`ok   ${source}: ${object.kind}/${object.metadata.name} (operator schema)`);
  } catch (e) {
    console.log(`FAIL ${source}: ${object.kind}/${object.metadata.name}: ${e.message}`);
    failed++;
  }
}

// Pass 2: unknown fields. The file lives beside node_modules so the imports resolve.
const lines = [];
for (const kind of kinds) {
  lines.push(`import type { I${kind} } from "${MODELS}/${kind}";`);
}
items.forEach(({ source, object }, n) => {
  lines.push(`// ${source}`);
  lines.push(`export const o${n}: I${object.kind} = ${JSON.stringify(object, null, 2)};`);
});
const tsFile = path.resolve("objects.check.ts");
writeFileSync(tsFile, lines.join("\n") + "\n");
const tsc = createRequire(import.meta.url).resolve("typescript/bin/tsc");
try {
  execFileSync(
    process.execPath,
    [tsc, "--noEmit", "--strict", "--module", "nodenext", "--moduleResolution", "nodenext", "--skipLibCheck", tsFile],
    { stdio: ["ignore", "pipe", "pipe"] },
  );
  console.log(`ok   no field outside the CRD in ${items.length} object(s) (TypeScript excess-property check)`);
} catch (e) {
  console.log(`FAIL fields the CRD does not have:\n${e.stdout}${e.stderr}`);
  failed++;
}
process.exit(failed ? 1 : 0);

// Runs a wasm32-wasip1 program in Node's V8 (the engine Envoy embeds): node wasi-run.mjs MODULE.wasm DIR [ARGS...]
// DIR is made visible to the program at the same path.
import { readFileSync } from 'node:fs';
import { WASI } from 'node:wasi';
const [wasmPath, dir, ...args] = process.argv.slice(2);
const wasi = new WASI({ version: 'preview1', args: [wasmPath, ...args], env: {}, preopens: { [dir]: dir } });
const module = await WebAssembly.compile(readFileSync(wasmPath));
const instance = await WebAssembly.instantiate(module, wasi.getImportObject());
wasi.start(instance);

/**
 * Where the time goes in a V8 CPU profile (`node --cpu-prof`, e.g. the server's during figure 2
 * with `BENCH_CPU_PROF=1 npm run bench`):
 *
 *   npx tsx test/bench/profile-summary.ts <file.cpuprofile> [--skip <seconds>] [--top <n>]
 *
 * `--skip` leaves out the first seconds of the profile (start-up and warm-up: run.ts prints the
 * value that starts at the first measured run).
 *
 * Prints self time by area (keystrata's own files, each package in node_modules, Node's
 * internals, GC, idle), the functions with the most self time, and the functions with the most
 * inclusive time (each sample counted once per function on its stack), as % of busy time.
 */
import fs from 'node:fs';

interface ProfileNode {
  id: number;
  callFrame: { functionName: string; url: string; lineNumber: number };
  hitCount?: number;
  children?: number[];
}

interface Profile {
  nodes: ProfileNode[];
  samples: number[];
  timeDeltas: number[];
  startTime: number;
  endTime: number;
}

const args = process.argv.slice(2);
const option = (name: string, fallback: number): number => {
  const at = args.indexOf(name);
  if (at === -1) return fallback;
  const value = Number(args.splice(at, 2)[1]);
  if (!Number.isFinite(value) || value < 0) throw new Error(`${name} needs a number`);
  return value;
};
const skipSeconds = option('--skip', 0);
const top = option('--top', 25);
const file = args[0];
if (!file) {
  process.stderr.write('usage: npx tsx test/bench/profile-summary.ts <file.cpuprofile> [--skip <seconds>] [--top <n>]\n');
  process.exit(2);
}
const profile = JSON.parse(fs.readFileSync(file, 'utf8')) as Profile;
const byId = new Map(profile.nodes.map((n) => [n.id, n]));
const parent = new Map<number, number>();
for (const node of profile.nodes) for (const child of node.children ?? []) parent.set(child, node.id);

function area(node: ProfileNode): string {
  const { url, functionName } = node.callFrame;
  // natives (socket writes, crypto bindings, V8 builtins) have no URL: one area each, by name
  if (url === '') return functionName.startsWith('(') ? functionName : `native: ${functionName || '(anonymous)'}`;
  const pkg = /node_modules\/((?:@[^/]+\/)?[^/]+)/.exec(url);
  if (pkg) return `npm: ${pkg[1]}`;
  if (url.startsWith('node:internal/deps/')) return `node: ${url.slice(5).split('/').slice(0, 3).join('/')}`;
  if (url.startsWith('node:internal/')) return `node: ${url.slice(5).split('/').slice(0, 2).join('/').replace(/\.js$/, '')}`;
  if (url.startsWith('node:')) return `node: ${url.slice(5)}`;
  const own = /\/(src|test|migrations)\/(.*)$/.exec(url);
  if (own) return `${own[1]}/${own[2]}`;
  return url;
}

const label = (node: ProfileNode) => {
  const { functionName, url, lineNumber } = node.callFrame;
  const where = url === '' ? '' : ` ${url.replace(/^file:\/\/.*?\/(src|test|node_modules)\//, '$1/')}:${lineNumber + 1}`;
  return `${functionName || '(anonymous)'}${where}`;
};

const self = new Map<string, number>();
const selfArea = new Map<string, number>();
const inclusive = new Map<string, number>();
let total = 0;
let idle = 0;
let clock = profile.startTime;
for (const [i, sample] of profile.samples.entries()) {
  clock += profile.timeDeltas[i] ?? 0;
  if (clock - profile.startTime < skipSeconds * 1e6) continue;
  const ms = (profile.timeDeltas[i + 1] ?? profile.timeDeltas[i] ?? 0) / 1000;
  const node = byId.get(sample);
  if (!node) continue;
  total += ms;
  if (node.callFrame.functionName === '(idle)') idle += ms;
  self.set(label(node), (self.get(label(node)) ?? 0) + ms);
  selfArea.set(area(node), (selfArea.get(area(node)) ?? 0) + ms);
  const seen = new Set<string>();
  for (let id: number | undefined = sample; id !== undefined; id = parent.get(id)) {
    const frame = byId.get(id);
    if (!frame || frame.callFrame.functionName === '(root)') continue;
    const key = label(frame);
    if (seen.has(key)) continue;
    seen.add(key);
    inclusive.set(key, (inclusive.get(key) ?? 0) + ms);
  }
}

const busy = total - idle;
const pct = (ms: number) => `${((100 * ms) / busy).toFixed(1).padStart(5)} %`;
const print = (title: string, entries: Map<string, number>, n: number, skip: (key: string) => boolean = () => false) => {
  process.stdout.write(`\n${title}\n`);
  for (const [key, ms] of [...entries].filter(([k]) => !skip(k)).sort((a, b) => b[1] - a[1]).slice(0, n)) {
    process.stdout.write(`  ${pct(ms)}  ${(ms / 1000).toFixed(2).padStart(7)} s  ${key}\n`);
  }
};

process.stdout.write(`${file}\n`);
process.stdout.write(`profiled ${((profile.endTime - profile.startTime) / 1e6).toFixed(1)} s, ${profile.samples.length} samples${skipSeconds > 0 ? `, the first ${skipSeconds} s left out` : ''}; busy ${(busy / 1000).toFixed(1)} s, idle ${(idle / 1000).toFixed(1)} s (percentages are of busy time)\n`);
print('self time by area', selfArea, 30, (k) => k === '(idle)');
print(`top ${top} functions by self time`, self, top, (k) => k.startsWith('(idle)'));
print(`top ${top} functions by inclusive time`, inclusive, top, (k) => k.startsWith('(idle)') || k.startsWith('(program)'));

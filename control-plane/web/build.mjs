// Assemble dist/: our page sources plus xterm.js, its fit addon and uPlot from node_modules.
// `outpost` embeds dist/ when it is built (control-plane/build.rs), and cargo rebuilds it when
// a file there changes: so a file is written only when its bytes differ, and files no longer
// produced are removed. A build with nothing changed touches nothing.
import { existsSync, mkdirSync, readFileSync, readdirSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { dirname, join, relative } from 'node:path';
import { fileURLToPath } from 'node:url';

const root = dirname(fileURLToPath(import.meta.url));
const dist = join(root, 'dist');

function walk(dir) {
  if (!existsSync(dir)) return [];
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? walk(path) : [path];
  });
}

// dist-relative path -> source file
const wanted = new Map();
for (const path of walk(join(root, 'src'))) wanted.set(relative(join(root, 'src'), path), path);
for (const [src, dst] of [
  ['node_modules/@xterm/xterm/lib/xterm.js', 'vendor/xterm.js'],
  ['node_modules/@xterm/xterm/css/xterm.css', 'vendor/xterm.css'],
  ['node_modules/@xterm/addon-fit/lib/addon-fit.js', 'vendor/addon-fit.js'],
  ['node_modules/uplot/dist/uPlot.iife.min.js', 'vendor/uPlot.iife.min.js'],
  ['node_modules/uplot/dist/uPlot.min.css', 'vendor/uPlot.min.css'],
]) {
  wanted.set(dst, join(root, src));
}

let written = 0;
let removed = 0;
for (const [rel, src] of wanted) {
  const bytes = readFileSync(src);
  const dst = join(dist, rel);
  if (existsSync(dst) && readFileSync(dst).equals(bytes)) continue;
  mkdirSync(dirname(dst), { recursive: true });
  writeFileSync(dst, bytes);
  written += 1;
}
for (const path of walk(dist)) {
  if (!wanted.has(relative(dist, path))) {
    rmSync(path);
    removed += 1;
  }
}
console.log(`web assets in control-plane/web/dist: ${wanted.size} files, ${written} written, ${removed} removed`);

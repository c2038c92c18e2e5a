// Assemble dist/: our page sources plus xterm.js, its fit addon and uPlot from node_modules.
// `outpost` embeds dist/ when it is built (control-plane/build.rs).
import { cpSync, mkdirSync, rmSync } from 'node:fs';

const from = (p) => new URL(p, import.meta.url);
rmSync(from('dist'), { recursive: true, force: true });
mkdirSync(from('dist/vendor'), { recursive: true });
cpSync(from('src'), from('dist'), { recursive: true });
for (const [src, dst] of [
  ['node_modules/@xterm/xterm/lib/xterm.js', 'dist/vendor/xterm.js'],
  ['node_modules/@xterm/xterm/css/xterm.css', 'dist/vendor/xterm.css'],
  ['node_modules/@xterm/addon-fit/lib/addon-fit.js', 'dist/vendor/addon-fit.js'],
  ['node_modules/uplot/dist/uPlot.iife.min.js', 'dist/vendor/uPlot.iife.min.js'],
  ['node_modules/uplot/dist/uPlot.min.css', 'dist/vendor/uPlot.min.css'],
]) {
  cpSync(from(src), from(dst));
}
console.log('web assets built in control-plane/web/dist');

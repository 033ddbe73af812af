// graphile-worker's side of scripts/bench/queue_vs_graphile.sh: JOBS no-op jobs added to a
// fresh database, then run by one runner at CONCURRENCY until every job succeeded.
//
//   node graphile_noop.mjs DATABASE_URL JOBS CONCURRENCY
import { Logger, makeWorkerUtils, run } from "graphile-worker";

// Quiet: a line per job would cost graphile-worker time ours does not spend.
const logger = new Logger(() => () => {});

const [connectionString, jobsArg, concurrencyArg] = process.argv.slice(2);
const jobs = Number(jobsArg);
const concurrency = Number(concurrencyArg);

const utils = await makeWorkerUtils({ connectionString, logger });
await utils.migrate();
const addStarted = performance.now();
for (let i = 0; i < jobs; i += 200) {
  const batch = Math.min(200, jobs - i);
  await Promise.all(Array.from({ length: batch }, () => utils.addJob("noop", {})));
}
console.log(`created ${jobs} jobs in ${((performance.now() - addStarted) / 1000).toFixed(2)}s`);

let done = 0;
let finished;
const allDone = new Promise((resolve) => (finished = resolve));
const started = performance.now();
const runner = await run({
  connectionString,
  concurrency,
  noHandleSignals: true,
  logger,
  pollInterval: 1000,
  taskList: { noop: async () => {} },
});
runner.events.on("job:success", () => {
  done += 1;
  if (done === jobs) finished();
});
await allDone;
const secs = (performance.now() - started) / 1000;
await runner.stop();
await utils.release();
console.log(
  `graphile-worker concurrency ${concurrency}: ${jobs} jobs in ${secs.toFixed(2)}s = ` +
    `${(jobs / secs).toFixed(0)} jobs/s`,
);

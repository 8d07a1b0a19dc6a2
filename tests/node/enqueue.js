// Enqueue one backstop task by name from Node.js with celery-node (Celery message protocol 2,
// JSON), as a service written in JavaScript would.
//   node enqueue.js BROKER_URL TASK_NAME QUEUE 'KWARGS_JSON'
const celery = require("celery-node");

async function main() {
  const [brokerUrl, taskName, queue, kwargsJson] = process.argv.slice(2);
  const client = celery.createClient(brokerUrl, brokerUrl, queue);
  client.conf.TASK_PROTOCOL = 2;
  const task = client.createTask(taskName);
  const result = task.applyAsync([], JSON.parse(kwargsJson));
  console.log(result.taskId);
  // Give the publish a moment to flush, then close the connections.
  await new Promise((resolve) => setTimeout(resolve, 300));
  await client.disconnect();
}

main().catch((error) => {
  console.error(error);
  process.exit(1);
});

// A producer in another language: celery-node publishes a protocol-2 JSON message.
// Usage: BROKER_URL=redis://127.0.0.1:6379/0 node producer.js '<kwargs as JSON>'
const celery = require("celery-node");

const url = process.env.BROKER_URL || "redis://127.0.0.1:6379/0";
const client = celery.createClient(url, url, process.env.COMMANDS_QUEUE || "commands");
const kwargs = JSON.parse(process.argv[2]);

client
  .createTask("users.create")
  .applyAsync([], kwargs)
  .get(30000)
  .then((result) => {
    console.log(JSON.stringify(result));
    client.disconnect();
  })
  .catch((error) => {
    console.error(String(error));
    client.disconnect();
    process.exit(1);
  });

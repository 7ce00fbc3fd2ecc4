// Live hop list: one line per applied or failed message (CONTRACT websocket).
const list = document.getElementById("hops");
const scheme = location.protocol === "https:" ? "wss" : "ws";

function render(message) {
  const li = document.createElement("li");
  li.className = message.status;
  const b = document.createElement("b");
  b.textContent = message.action || "(no action)";
  const route = document.createElement("span");
  route.className = "mono";
  route.textContent = ` ${message.from.slice(0, 10)}… → ${message.target.slice(0, 10)}… `;
  const badge = document.createElement("span");
  badge.className = "badge";
  badge.textContent = message.status;
  li.append(b, route, badge);
  list.prepend(li);
  while (list.children.length > 200) list.lastElementChild.remove();
}

function connect() {
  const socket = new WebSocket(`${scheme}://${location.host}/ws/flows/`);
  socket.onmessage = (e) => {
    const event = JSON.parse(e.data);
    if (event.type === "hop") render(event.message);
  };
  socket.onclose = () => setTimeout(connect, 1000);
}
connect();

// The routing explorer (moe_utils/stages/explorer.py): builds the widget from the JSON block next to this
// script. Model and dataset text (tokens, labels, categories) is only ever set through textContent.
(function () {
  "use strict";
  var root = document.currentScript.parentElement;
  var D = JSON.parse(root.querySelector("script.mx-data").textContent);
  var M = D.meta, T = D.tokens, L = M.n_layers, E = M.n_experts, NE = L * E;
  var nTok = T.text.length;
  var state = {level: 0, hover: null, pinned: null, atom: null, expert: null, mask: -1, focus: 0};

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }
  function expertName(row) { return "L" + Math.floor(row / E) + "E" + (row % E); }
  function fmt(x, digits) { return x === null || x === undefined ? "n/a" : Number(x).toFixed(digits); }
  function displayText(text) {  // a newline shows as a return sign, a tab as an arrow
    return text.replace(/\r/g, "").replace(/\n/g, "\u23ce\n").replace(/\t/g, "\u21e5");
  }
  function activate(node, handler) {  // click, Enter and Space
    node.addEventListener("click", handler);
    node.addEventListener("keydown", function (event) {
      if (event.key === "Enter" || event.key === " ") { event.preventDefault(); handler(event); }
    });
  }
  function table(headers, rows) {
    var t = el("table", "mx-table"), head = el("tr");
    headers.forEach(function (h) { head.appendChild(el("th", null, h)); });
    t.appendChild(head);
    rows.forEach(function (cells) {
      var tr = el("tr");
      cells.forEach(function (c) { tr.appendChild(el("td", null, c)); });
      t.appendChild(tr);
    });
    return t;
  }
  function clear(node) { while (node.firstChild) node.removeChild(node.firstChild); }

  // ---------------------------------------------------------------- header and controls
  var app = el("div", "mx-app");
  root.appendChild(app);
  var about = el("p", "mx-about");
  var run = Object.keys(M.run || {}).map(function (k) { return k + ": " + M.run[k]; }).join(", ");
  about.appendChild(el("strong", null, "Model: "));
  about.appendChild(el("code", null, M.model + (M.revision ? " @ " + M.revision : "")));
  about.appendChild(document.createTextNode(" \u00b7 " + M.n_layers + " MoE layers \u00d7 " + E +
    " experts, top-" + M.top_k + " \u00b7 run " + run));
  app.appendChild(about);
  var sample = "Showing " + M.n_questions_shown + " of the run's " + M.n_questions + " questions (" +
    M.n_tokens_shown + " of " + M.n_tokens + " tokens)";
  if (M.subsampled) sample += "; the questions shown are a random sample taken from each domain in turn";
  if (M.truncated) sample += "; each question is cut after its first " + M.max_tokens + " tokens";
  sample += ". Statistics of atoms and experts (labels, enrichment, partners, usage) are over all captured tokens.";
  app.appendChild(el("p", "mx-sample", sample));

  var controls = el("div", "mx-controls");
  app.appendChild(controls);
  var levelGroup = el("fieldset", "mx-levels"), levelName = "mx-level-" + Math.random().toString(36).slice(2);
  levelGroup.appendChild(el("legend", null, "Colour tokens by the atom of HSDL level"));
  D.levels.forEach(function (lv, i) {
    var label = el("label"), input = el("input");
    input.type = "radio"; input.name = levelName;
    input.value = String(i); input.checked = i === 0; input.className = "mx-level";
    input.addEventListener("change", function () { if (input.checked) setLevel(i); });
    label.appendChild(input); label.appendChild(document.createTextNode(" level " + lv.level));
    levelGroup.appendChild(label);
  });
  controls.appendChild(levelGroup);
  var maskLabel = el("label", "mx-mask-label", "Pruning mask (stage 4): ");
  var maskSelect = el("select", "mx-mask");
  maskSelect.appendChild(new Option("none", "-1"));
  D.masks.forEach(function (m, i) { maskSelect.appendChild(new Option(m.label, String(i))); });
  maskSelect.disabled = D.masks.length === 0;
  maskSelect.addEventListener("change", function () { setMask(parseInt(maskSelect.value, 10)); });
  maskLabel.appendChild(maskSelect);
  controls.appendChild(maskLabel);
  var maskSummary = el("span", "mx-mask-summary");
  controls.appendChild(maskSummary);

  var legend = el("div", "mx-legend");
  legend.setAttribute("aria-label", "legend");
  app.appendChild(legend);

  // ---------------------------------------------------------------- tokens
  var body = el("div", "mx-body");
  app.appendChild(body);
  var left = el("div", "mx-left"), right = el("div", "mx-right");
  body.appendChild(left); body.appendChild(right);
  left.appendChild(el("h4", null, "Tokens"));
  left.appendChild(el("p", "mx-help", "Hover or focus a token to see its routing; click it or press Enter " +
    "to keep it; arrow keys move between tokens."));
  var tokenBox = el("div", "mx-tokens");
  left.appendChild(tokenBox);
  var spans = [];
  var current = null;
  for (var i = 0; i < nTok; i++) {
    var q = T.question[i];
    if (q !== current) {
      current = q;
      var info = D.questions[q];
      var head = el("div", "mx-question", "Question " + info.sample + " (" + info.label + ")" +
        (info.n_shown < info.n_tokens ? ", first " + info.n_shown + " of " + info.n_tokens + " tokens" : ""));
      tokenBox.appendChild(head);
      var line = el("div", "mx-line");
      tokenBox.appendChild(line);
    }
    var span = el("span", "mx-token", displayText(T.text[i]));
    span.tabIndex = i === 0 ? 0 : -1;
    span.setAttribute("role", "button");
    span.setAttribute("aria-pressed", "false");
    span.dataset.index = String(i);
    span.dataset.row = String(T.row[i]);
    line.appendChild(span);
    spans.push(span);
  }
  tokenBox.addEventListener("mouseover", function (event) {
    var t = event.target.closest(".mx-token");
    if (t) { state.hover = +t.dataset.index; update(); }
  });
  tokenBox.addEventListener("mouseleave", function () { state.hover = null; update(); });
  tokenBox.addEventListener("focusin", function (event) {
    var t = event.target.closest(".mx-token");
    if (t) { moveFocus(+t.dataset.index, false); state.hover = +t.dataset.index; update(); }
  });
  tokenBox.addEventListener("focusout", function () { state.hover = null; update(); });
  tokenBox.addEventListener("click", function (event) {
    var t = event.target.closest(".mx-token");
    if (t) pin(+t.dataset.index);
  });
  tokenBox.addEventListener("keydown", function (event) {
    var t = event.target.closest(".mx-token");
    if (!t) return;
    var index = +t.dataset.index;
    if (event.key === "Enter" || event.key === " ") { event.preventDefault(); pin(index); }
    else if (event.key === "ArrowRight" || event.key === "ArrowDown") { event.preventDefault(); moveFocus(index + 1, true); }
    else if (event.key === "ArrowLeft" || event.key === "ArrowUp") { event.preventDefault(); moveFocus(index - 1, true); }
    else if (event.key === "Home") { event.preventDefault(); moveFocus(0, true); }
    else if (event.key === "End") { event.preventDefault(); moveFocus(nTok - 1, true); }
  });
  function moveFocus(index, focus) {
    if (index < 0 || index >= nTok) return;
    spans[state.focus].tabIndex = -1;
    state.focus = index;
    spans[index].tabIndex = 0;
    if (focus) spans[index].focus();
  }
  function pin(index) {
    state.pinned = state.pinned === index ? null : index;
    spans.forEach(function (s, j) { s.setAttribute("aria-pressed", String(j === state.pinned)); });
    update();
  }

  // ---------------------------------------------------------------- grid
  right.appendChild(el("h4", null, "Routing grid (MoE layer \u00d7 expert)"));
  right.appendChild(el("p", "mx-help", "Select an expert to see its partners in other layers and its usage " +
    "per domain."));
  var gridTitle = el("p", "mx-grid-title");
  right.appendChild(gridTitle);
  var grid = el("table", E > 32 ? "mx-grid mx-dense" : "mx-grid");  // many experts: no weights in the cells
  var cells = [];
  var headRow = el("tr");
  headRow.appendChild(el("th"));
  for (var e = 0; e < E; e++) headRow.appendChild(el("th", null, E > 32 && e % 8 ? "" : e));
  grid.appendChild(headRow);
  for (var l = 0; l < L; l++) {
    var tr = el("tr");
    tr.appendChild(el("th", null, "L" + l));
    for (e = 0; e < E; e++) {
      var td = el("td"), button = el("button", "mx-cell");
      button.type = "button";
      button.dataset.layer = String(l); button.dataset.expert = String(e);
      button.setAttribute("aria-label", "expert " + e + " of layer " + l);
      (function (row) { activate(button, function () { selectExpert(row); }); })(l * E + e);
      td.appendChild(button); tr.appendChild(td); cells.push(button);
    }
    grid.appendChild(tr);
  }
  right.appendChild(grid);
  var details = el("div", "mx-details");
  right.appendChild(details);

  // ---------------------------------------------------------------- atoms
  var atomSection = el("div", "mx-atoms");
  app.appendChild(atomSection);

  // ---------------------------------------------------------------- behaviour
  function levelData() { return D.levels[state.level]; }
  function atomInfo(atom) {
    var found = null;
    levelData().atoms.forEach(function (a) { if (a.atom === atom) found = a; });
    return found;
  }
  function tokenColour(atom) {
    if (atom < 0) return "#ffffff";
    return levelData().colours[String(atom)] || M.palette_other;
  }
  function setLevel(i) {
    state.level = i; state.atom = null;
    spans.forEach(function (s, j) {
      var atom = levelData().atom[j];
      s.style.backgroundColor = tokenColour(atom);
      s.classList.toggle("mx-none", atom < 0);
      s.title = atom < 0 ? "level " + levelData().level + ": no atom" :
        "level " + levelData().level + ": atom " + atom;
    });
    renderAtoms(); renderLegend(); update();
  }
  function setMask(i) {
    state.mask = i;
    var pruned = new Set(i >= 0 ? D.masks[i].pruned : []);
    cells.forEach(function (c, row) { c.classList.toggle("mx-pruned", pruned.has(row)); });
    var losing = 0;
    spans.forEach(function (s, j) {
      var lost = 0;
      for (var l = 0; l < L; l++) {
        var ex = T.experts[j][l], w = T.weights[j][l], best = 0;
        for (var k = 1; k < ex.length; k++) if (w[k] > w[best]) best = k;
        if (pruned.has(l * E + ex[best])) lost++;
      }
      s.classList.toggle("mx-loses-top", lost > 0);
      if (lost > 0) { s.dataset.lostLayers = String(lost); losing++; } else delete s.dataset.lostLayers;
    });
    clear(maskSummary);
    if (i >= 0) {
      maskSummary.textContent = " " + D.masks[i].pruned.length + " of " + NE + " experts pruned; " + losing +
        " of " + nTok + " tokens shown lose their top expert in at least one layer (underlined).";
    }
    update();
  }
  function selectAtom(atom) {
    state.atom = state.atom === atom ? null : atom;
    update();
  }
  function selectExpert(row) {
    state.expert = state.expert === row ? null : row;
    update();
  }

  function renderAtoms() {
    clear(atomSection);
    var lv = levelData();
    atomSection.appendChild(el("h4", null, "Atoms of level " + lv.level));
    atomSection.appendChild(el("p", "mx-help", "Select an atom to outline its experts on the grid and the tokens " +
      "it explains best among those shown. Counts are over all captured tokens."));
    var list = el("div", "mx-atom-list");
    lv.atoms.forEach(function (a) {
      var b = el("button", "mx-atom");
      b.type = "button";
      b.dataset.atom = String(a.atom);
      b.setAttribute("aria-pressed", "false");
      var swatch = el("span", "mx-swatch");
      swatch.style.backgroundColor = tokenColour(a.atom);
      b.appendChild(swatch);
      b.appendChild(el("strong", null, "atom " + a.atom));
      b.appendChild(el("span", "mx-atom-label", a.label));
      b.appendChild(el("span", "mx-atom-count", a.n_tokens + " tokens"));
      activate(b, function (event) { event.preventDefault(); selectAtom(a.atom); });
      list.appendChild(b);
    });
    atomSection.appendChild(list);
  }

  function swatchItem(colour, text, cls) {
    var item = el("span", "mx-legend-item");
    var sw = el("span", "mx-swatch" + (cls ? " " + cls : ""));
    if (colour) sw.style.backgroundColor = colour;
    item.appendChild(sw); item.appendChild(document.createTextNode(" " + text));
    return item;
  }
  function renderLegend() {
    clear(legend);
    var lv = levelData();
    legend.appendChild(el("strong", null, "Legend. Token colour = atom explaining it best at level " + lv.level + ": "));
    Object.keys(lv.colours).forEach(function (atom) {
      var info = atomInfo(+atom);
      legend.appendChild(swatchItem(lv.colours[atom], "atom " + atom + (info ? ": " + info.label : "")));
    });
    legend.appendChild(swatchItem(M.palette_other, "other atoms"));
    legend.appendChild(swatchItem("#ffffff", "no atom", "mx-none"));
    legend.appendChild(el("br"));
    legend.appendChild(el("strong", null, "Grid: "));
    legend.appendChild(swatchItem("#2b6cb0", "routed (darker = larger weight" +
      (E <= 32 ? "; the number is the weight)" : "; hover a cell for its weight)")));
    legend.appendChild(swatchItem(null, "experts of the selected atom", "mx-legend-atom"));
    legend.appendChild(swatchItem(null, "selected expert", "mx-legend-selected"));
    legend.appendChild(swatchItem(null, "its partners", "mx-legend-partner"));
    legend.appendChild(swatchItem(null, "pruned by the chosen mask", "mx-legend-pruned"));
    legend.appendChild(el("br"));
    legend.appendChild(el("strong", null, "Tokens: "));
    legend.appendChild(swatchItem(null, "explained by the selected atom", "mx-legend-atom-token"));
    legend.appendChild(swatchItem(null, "loses its top expert under the chosen mask", "mx-legend-loses"));
  }

  function tokenDetails(i) {
    var box = el("div", "mx-panel mx-token-panel");
    var info = D.questions[T.question[i]];
    var title = el("p");
    title.appendChild(el("strong", null, state.pinned === i ? "Kept token " : "Token "));
    title.appendChild(el("code", "mx-token-text", displayText(T.text[i])));
    title.appendChild(document.createTextNode(" of question " + info.sample + " (" + info.label + "), store row " +
      T.row[i]));
    box.appendChild(title);
    D.levels.forEach(function (lv) {
      var rows = lv.token_atoms[i].map(function (pair) {
        var label = "";
        lv.atoms.forEach(function (a) { if (a.atom === pair[0]) label = a.label; });
        return ["atom " + pair[0], label, fmt(pair[1], 3)];
      });
      box.appendChild(el("p", "mx-sub", "Level " + lv.level + " atoms (contribution = routing mass reconstructed)"));
      box.appendChild(rows.length ? table(["atom", "label", "contribution"], rows) : el("p", null, "no atom"));
    });
    return box;
  }
  function atomDetails(a) {
    var box = el("div", "mx-panel mx-atom-panel");
    var shown = levelData().atom.filter(function (x) { return x === a.atom; }).length;
    box.appendChild(el("p", null, "Atom " + a.atom + " of level " + levelData().level + ": " + a.label));
    box.appendChild(el("p", "mx-sub", a.n_tokens + " tokens in all, " + shown + " among those shown; experts: " +
      (a.experts.map(expertName).join(", ") || "none above the threshold")));
    box.appendChild(el("p", "mx-sub", "Top tokens: " + (a.top_tokens.map(function (t) { return JSON.stringify(t); })
      .join(" ") || "none")));
    box.appendChild(el("p", "mx-sub", "Domain enrichment, questions as the unit (Mann-Whitney U, corrected q):"));
    box.appendChild(table(["domain", "lift", "q", "significant"], a.enrichment.map(function (r) {
      return [r.category, fmt(r.lift, 2), r.q.toPrecision(2), r.significant ? "yes" : "no"];
    })));
    return box;
  }
  function expertDetails(row) {
    var X = D.experts, box = el("div", "mx-panel mx-expert-panel");
    box.appendChild(el("p", null, "Expert " + expertName(row) + ": selected for " + fmt(100 * X.usage[row], 1) +
      "% of all captured tokens"));
    var headers = ["partner", "lift", "P(together)"];
    if (M.lift_given_token) headers.push("lift given the token");
    box.appendChild(el("p", "mx-sub", "Partners in other layers by co-activation lift P(a,b)/(P(a)P(b))" +
      (M.lift_given_token ? "" : "; the lift given the token (token-identity null) is not in this run")));
    box.appendChild(table(headers, X.partners[row].map(function (p) {
      var r = [expertName(p.expert), fmt(p.lift, 2), fmt(p.together, 4)];
      if (M.lift_given_token) r.push(fmt(p.lift_given_token, 2));
      return r;
    })));
    box.appendChild(el("p", "mx-sub", "Share of each domain's tokens that select it:"));
    box.appendChild(table(["domain", "share"], X.domains.map(function (d, j) {
      return [d, fmt(100 * X.domain_usage[j][row], 1) + "%"];
    })));
    return box;
  }

  function update() {
    var token = state.hover !== null ? state.hover : state.pinned;
    var weights = {};
    if (token !== null) {
      for (var l = 0; l < L; l++) {
        T.experts[token][l].forEach(function (ex, k) { weights[l * E + ex] = T.weights[token][l][k]; });
      }
    }
    var atom = state.atom !== null ? atomInfo(state.atom) : null;
    var atomExperts = new Set(atom ? atom.experts : []);
    var partners = new Set(state.expert !== null ? D.experts.partners[state.expert].map(function (p) { return p.expert; }) : []);
    cells.forEach(function (c, row) {
      var w = weights[row];
      var routed = w !== undefined;
      c.classList.toggle("mx-routed", routed);
      c.textContent = routed && E <= 32 ? fmt(w, 2).replace(/^0/, "") : "";
      c.style.backgroundColor = routed ? "rgba(43,108,176," + (0.25 + 0.75 * Math.min(1, w)) + ")" : "";
      c.style.color = routed && w > 0.45 ? "#fff" : "";
      c.title = expertName(row) + (routed ? ": weight " + fmt(w, 3) : "");
      c.classList.toggle("mx-atom-expert", atomExperts.has(row));
      c.classList.toggle("mx-selected", state.expert === row);
      c.setAttribute("aria-pressed", String(state.expert === row));
      c.classList.toggle("mx-partner", partners.has(row));
    });
    gridTitle.textContent = token !== null ? "Routing of the token " + JSON.stringify(T.text[token]) +
      " (top-" + M.top_k + " weights per layer)" : "Hover over or focus a token to see its routing.";
    var levelAtoms = levelData().atom;
    spans.forEach(function (s, j) { s.classList.toggle("mx-atom-token", atom !== null && levelAtoms[j] === state.atom); });
    atomSection.querySelectorAll(".mx-atom").forEach(function (b) {
      b.setAttribute("aria-pressed", String(+b.dataset.atom === state.atom));
    });
    clear(details);
    if (token !== null) details.appendChild(tokenDetails(token));
    if (atom) details.appendChild(atomDetails(atom));
    if (state.expert !== null) details.appendChild(expertDetails(state.expert));
  }

  setLevel(0);
  setMask(-1);
  root.dataset.readyMs = String(Math.round(performance.now()));  // since the page's navigation began
  root.dataset.ready = "1";
})();

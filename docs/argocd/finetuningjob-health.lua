-- Argo CD health check for kubetune.dev/FineTuningJob.
-- Install it under resource.customizations.health.kubetune.dev_FineTuningJob
-- in the argocd-cm ConfigMap (see docs/argocd.md).
local hs = {}

local function condition(status, kind)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then
      return c
    end
  end
  return nil
end

local function is_true(status, kind)
  local c = condition(status, kind)
  return c ~= nil and c.status == "True"
end

local status = obj.status
if status == nil then
  hs.status = "Progressing"
  hs.message = "Waiting for the kubetune operator"
  return hs
end

local generation = obj.metadata and obj.metadata.generation
if generation ~= nil and (status.observedGeneration == nil or status.observedGeneration < generation) then
  hs.status = "Progressing"
  hs.message = "Waiting for the operator to apply generation " .. tostring(generation)
  return hs
end

local phase = status.phase or "Pending"
local ready = condition(status, "Ready")
local detail = ""
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  detail = ": " .. ready.message
end

if is_true(status, "Ready") then
  hs.status = "Healthy"
elseif is_true(status, "Failed") or is_true(status, "Cancelled") then
  hs.status = "Degraded"
elseif is_true(status, "Suspended") then
  hs.status = "Suspended"
else
  hs.status = "Progressing"
end
hs.message = phase .. detail
return hs

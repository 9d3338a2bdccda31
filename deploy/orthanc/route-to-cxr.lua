-- Orthanc as the PACS router: every CR and DX radiograph it stores is sent to the
-- cxr DICOM node (the modality `cxr` of orthanc.json), which files its SR and
-- Secondary Capture back into the same study. Results (SR, OT) are not sent on.
function OnStoredInstance(instanceId, tags, metadata, origin)
  local modality = tags['Modality']
  if (modality == 'CR' or modality == 'DX') and origin['RequestOrigin'] ~= 'Lua' then
    SendToModality(instanceId, 'cxr')
  end
end
